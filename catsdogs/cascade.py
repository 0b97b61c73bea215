"""A cascade file whose models each take their own view of a photo (``train.cascade_views: own``).

The file (``export.cascade``) takes ``image``, the first model's view, and one more input per
other view, named by :func:`view_name`, which only its escalated path reads. Its contract lists
them (``cascade.views``: each input's name and preprocessing), so whoever runs it prepares a
photo's other views only when the first model is unsure of it: the export and evaluate stages
run the whole file twice (:func:`two_step`); the server and ``make bench`` run its two steps
apart (:func:`first_step`, then :func:`second_step` fed the first model's answers), so no model
runs twice on a photo. No torch here: the server imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from catsdogs.contract import CASCADE_BELOW, EVERY_ROW, INPUT_NAME, OUTPUT_PROBABILITIES
from catsdogs.preprocessing import PreprocessSpec

Run = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


def view_name(input_size: int, resize: int | None = None) -> str:
    """The file's input for the view ``input_size`` px of a ``resize`` px shorter side."""
    return f"{INPUT_NAME}@{input_size}" + (f"/{resize}" if resize is not None else "")


def contract_views(cascade: Mapping[str, Any] | None) -> dict[str, PreprocessSpec]:
    """The view inputs a contract's ``cascade`` entry lists (input -> preprocessing); {} for a
    file without any (no cascade, or every model on ``image``)."""
    views = (cascade or {}).get("views") or []
    if not isinstance(views, list):
        raise ValueError(f"cascade.views must be a list, got {type(views).__name__}")
    return {str(v["input"]): PreprocessSpec.from_json(v["preprocessing"]) for v in views}


def views_entry(specs: Mapping[str, PreprocessSpec]) -> list[dict[str, str]]:
    """``contract_views``'s inverse: what the contract's ``cascade.views`` holds."""
    return [{"input": name, "preprocessing": spec.to_json()} for name, spec in specs.items()]


def two_step(
    run: Run, batch: np.ndarray, views: Callable[[np.ndarray], Mapping[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """A cascade file's answers, its other views prepared only for the rows that escalate.

    ``run(feed)`` runs the file (-> probabilities, escalated); ``views(rows)`` gives every view
    input of those rows (indices into ``batch``). The first call feeds ``image`` alone; the
    escalated rows then run again with their views, and their answers replace the first's.
    Returns (probabilities (N, C), escalated (N,))."""
    probs, escalated = run({INPUT_NAME: batch})
    rows = np.flatnonzero(escalated)
    if len(rows):
        again, _ = run({INPUT_NAME: batch[rows], **views(rows)})
        probs = probs.copy()
        probs[rows] = again
    return probs, escalated


def second_feed(
    answers_input: str,
    images: np.ndarray,
    answers: np.ndarray,
    views: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """What a cascade's second step (:func:`second_step`, input ``answers_input``) is fed for
    rows its first step escalated: their first view, the first model's answers, their other
    views, and the threshold that sends every one of them on (they were chosen already)."""
    return {
        INPUT_NAME: images,
        answers_input: answers,
        CASCADE_BELOW: np.array(EVERY_ROW, np.float32),
        **views,
    }


# The protobuf fields first_step and second_step read (onnx.proto): ModelProto.graph;
# GraphProto.node, .initializer, .input, .output and .value_info; ValueInfoProto.name and .type;
# NodeProto.input, .output, .op_type and .attribute; AttributeProto.name, .g and .graphs;
# TensorProto.name, .data_type, .float_data and .raw_data
MODEL_GRAPH, GRAPH_NODE, GRAPH_INPUT, VALUE_INFO_NAME = 7, 1, 11, 1
GRAPH_INITIALIZER, GRAPH_OUTPUT, GRAPH_VALUE_INFO, VALUE_INFO_TYPE = 5, 12, 13, 2
NODE_INPUT, NODE_OUTPUT, NODE_OP_TYPE, NODE_ATTRIBUTE = 1, 2, 4, 5
ATTRIBUTE_NAME, ATTRIBUTE_G, ATTRIBUTE_GRAPHS, TENSOR_NAME = 1, 6, 11, 8
TENSOR_DATA_TYPE, TENSOR_FLOAT_DATA, TENSOR_RAW_DATA = 2, 4, 9
FLOAT32 = b"\x01"  # TensorProto.FLOAT, as its varint
LENGTH_DELIMITED = 2


def first_step(model: bytes) -> bytes | None:
    """A cascade file's first step alone: the same file with its ``If``'s escalated branch
    replaced by its other branch, which passes the first model's answers on. None: not a
    cascade file (no ``cascade/below`` input).

    The server runs the first model in several sessions (one per thread policy, one for
    parallel runs) and the other models in one: every session of the whole file would hold every
    model's weights (a 50 MB file took 110 MB in each). Edited at the protobuf level, field by
    field, all others kept byte for byte, because the server has no ``onnx`` package.
    """
    model = memoryview(model)  # the fields read are views of it, not copies
    if not _is_cascade(list(_fields(_graph(model)))):
        return None
    return _edit(model, MODEL_GRAPH, _first_step_graph)[0]


def _first_step_graph(graph: memoryview) -> tuple[bytes, int]:
    ifs = 0

    def node(payload: memoryview) -> tuple[bytes | memoryview, int]:
        nonlocal ifs
        fields = list(_fields(payload))
        if not any(n == NODE_OP_TYPE and v == b"If" for n, _, _, v in fields):
            return payload, 0
        branches = {}
        for n, wire, _, v in fields:
            if n == NODE_ATTRIBUTE and wire == LENGTH_DELIMITED:
                attribute = {a: p for a, _, _, p in _fields(v)}
                name = attribute.get(ATTRIBUTE_NAME)
                branches[bytes(name) if name is not None else None] = attribute.get(ATTRIBUTE_G)
        sure = branches.get(b"else_branch")
        if sure is None or b"then_branch" not in branches:
            raise ValueError(NO_BRANCHES)

        def attribute(payload: memoryview) -> tuple[bytes | memoryview, int]:
            names = [p for a, _, _, p in _fields(payload) if a == ATTRIBUTE_NAME]
            if names != [b"then_branch"]:
                return payload, 0
            return _edit(payload, ATTRIBUTE_G, lambda _: (sure, 1))

        ifs += 1
        return _edit(payload, NODE_ATTRIBUTE, attribute)[0], 1

    edited, _ = _edit(graph, GRAPH_NODE, node)
    _check_ifs(ifs)
    return edited, 1


def second_step(model: bytes) -> tuple[bytes, str] | None:
    """A cascade file's second step alone: the same file without its first model, whose
    answers become an input. Returns the file and that input's name (the tensor the ``If``'s
    sure branch passes on); None: not a cascade file (no ``cascade/below`` input).

    The server runs the rows its first step is unsure of through this (``escalate``), feeding
    the first step's answers, so the first model neither runs twice on them nor has its weights
    held twice. Every node the outputs need is kept, byte for byte, but those that only made
    the first model's answers; every initializer no kept node (or branch) reads is dropped. The
    inputs stay as they are (a cascade reads ``image``'s row count, and a member on the first
    model's view reads ``image`` itself), plus the new one, typed as the file's
    ``probabilities`` output.
    """
    view = memoryview(model)
    fields = list(_fields(_graph(view)))
    if not _is_cascade(fields):
        return None
    inputs = {_name(p, VALUE_INFO_NAME) for n, _, _, p in fields if n == GRAPH_INPUT}
    nodes = {i: _Node(p) for i, (n, _, _, p) in enumerate(fields) if n == GRAPH_NODE}
    ifs = [node for node in nodes.values() if node.op_type == "If"]
    _check_ifs(len(ifs))
    sure = ifs[0].graphs.get("else_branch")
    if sure is None or "then_branch" not in ifs[0].graphs:
        raise ValueError(NO_BRANCHES)
    passed = [n for n in _Node.all_in(sure) if n.op_type == "Identity" and len(n.inputs) == 1]
    if len(passed) != 1:
        raise ValueError("the cascade's sure branch does not pass one tensor on")
    first = passed[0].inputs[0]
    outputs = {_name(p, VALUE_INFO_NAME): p for n, _, _, p in fields if n == GRAPH_OUTPUT}
    answer = outputs.get(OUTPUT_PROBABILITIES)
    if answer is None:
        raise ValueError(f"a cascade file with no {OUTPUT_PROBABILITIES!r} output")
    # what the outputs need, walking back from them: the first model's answers are an input now
    given = inputs | {first}
    needed, kept = set(outputs), set()
    for i, node in reversed(nodes.items()):
        if any(o in needed and o not in given for o in node.outputs):
            kept.add(i)
            needed.update(node.reads())
    types = [p for n, _, _, p in _fields(answer) if n == VALUE_INFO_TYPE]
    new_input = _field(VALUE_INFO_NAME, first.encode()) + b"".join(
        _field(VALUE_INFO_TYPE, t) for t in types
    )
    out = bytearray()
    for i, (n, wire, head, payload) in enumerate(fields):
        if wire == LENGTH_DELIMITED and (
            (n == GRAPH_NODE and i not in kept)
            or (n == GRAPH_INITIALIZER and _name(payload, TENSOR_NAME) not in needed)
            or (n == GRAPH_VALUE_INFO and _name(payload, VALUE_INFO_NAME) not in needed)
        ):
            continue
        out += head
        out += payload
        if n == GRAPH_INPUT and _name(payload, VALUE_INFO_NAME) == CASCADE_BELOW:
            out += _field(GRAPH_INPUT, new_input)
    return _edit(view, MODEL_GRAPH, lambda _: (bytes(out), 1))[0], first


def threshold(model: bytes) -> float | None:
    """A cascade file's own threshold: the value of its ``cascade/below`` initializer, which its
    ``If`` compares the first model's top probability with. None: not a cascade file."""
    fields = list(_fields(_graph(memoryview(model))))
    if not _is_cascade(fields):
        return None
    for n, wire, _, payload in fields:
        if n == GRAPH_INITIALIZER and wire == LENGTH_DELIMITED:
            if _name(payload, TENSOR_NAME) != CASCADE_BELOW:
                continue
            tensor = list(_fields(payload))
            kinds = [bytes(v) for k, _, _, v in tensor if k == TENSOR_DATA_TYPE]
            values = [v for k, _, _, v in tensor if k in (TENSOR_FLOAT_DATA, TENSOR_RAW_DATA)]
            if kinds != [FLOAT32] or len(values) != 1 or len(values[0]) != 4:
                raise ValueError(f"the cascade's {CASCADE_BELOW} is not one float32")
            return float(np.frombuffer(values[0], "<f4")[0])
    raise ValueError(f"a cascade file whose {CASCADE_BELOW} input has no value")


NO_BRANCHES = "the cascade's If has no then_branch and else_branch"


def _graph(model: memoryview) -> memoryview:
    """The graph of a ModelProto, or ValueError when ``model`` is not one."""
    graphs = [p for n, w, _, p in _fields(model) if n == MODEL_GRAPH and w == LENGTH_DELIMITED]
    if len(graphs) != 1:
        raise ValueError("not an ONNX model: no graph")
    return graphs[0]


def _is_cascade(graph: list[tuple[int, int, memoryview, memoryview]]) -> bool:
    """Whether a graph (its fields) has the cascade's threshold among its inputs."""
    return any(
        n == GRAPH_INPUT and w == LENGTH_DELIMITED and _name(p, VALUE_INFO_NAME) == CASCADE_BELOW
        for n, w, _, p in graph
    )


def _check_ifs(count: int) -> None:
    if count != 1:
        raise ValueError(f"a cascade file has one If in its graph, this one {count}")


class _Node:
    """What ``second_step`` reads of a NodeProto: its names, and its subgraphs by attribute."""

    def __init__(self, payload: memoryview) -> None:
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.op_type = ""
        self.graphs: dict[str, list[memoryview]] = {}
        for n, _, _, value in _fields(payload):
            if n == NODE_INPUT:
                self.inputs.append(bytes(value).decode())
            elif n == NODE_OUTPUT:
                self.outputs.append(bytes(value).decode())
            elif n == NODE_OP_TYPE:
                self.op_type = bytes(value).decode()
            elif n == NODE_ATTRIBUTE:
                attribute = list(_fields(value))
                name = next(
                    (bytes(v).decode() for a, _, _, v in attribute if a == ATTRIBUTE_NAME), ""
                )
                found = [v for a, _, _, v in attribute if a in (ATTRIBUTE_G, ATTRIBUTE_GRAPHS)]
                if found:
                    self.graphs[name] = found

    @classmethod
    def all_in(cls, graphs: list[memoryview]) -> list[_Node]:
        return [cls(p) for g in graphs for n, _, _, p in _fields(g) if n == GRAPH_NODE]

    def reads(self) -> set[str]:
        """Every name this node reads, its subgraphs' reads from the outer scope included."""
        names = {i for i in self.inputs if i}
        for graphs in self.graphs.values():
            for graph in graphs:
                made = {
                    _name(p, TENSOR_NAME) for n, _, _, p in _fields(graph) if n == GRAPH_INITIALIZER
                }
                made.update(
                    _name(p, VALUE_INFO_NAME) for n, _, _, p in _fields(graph) if n == GRAPH_INPUT
                )
                inner = _Node.all_in([graph])
                made.update(o for node in inner for o in node.outputs)
                names.update(r for node in inner for r in node.reads() if r not in made)
        return names


def _name(message: memoryview, number: int) -> str:
    """The string field ``number`` of ``message`` ('' when it has none)."""
    return next((bytes(v).decode() for n, _, _, v in _fields(message) if n == number), "")


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _edit(
    message: memoryview,
    number: int,
    change: Callable[[memoryview], tuple[bytes | memoryview, int]],
) -> tuple[bytes, int]:
    """``message`` with ``change`` applied to the payload of each length-delimited field
    ``number``; and the sum of the counts ``change`` returned."""
    out, count = bytearray(), 0
    for n, wire, head, payload in _fields(message):
        if n == number and wire == LENGTH_DELIMITED:
            payload, k = change(payload)
            count += k
            head = _varint((n << 3) | wire) + _varint(len(payload))
        out += head
        out += payload
    return bytes(out), count


def _fields(message: memoryview) -> Iterator[tuple[int, int, memoryview, memoryview]]:
    """Each field of a protobuf message in order: (number, wire type, its tag and length
    prefix as they are in ``message``, its payload)."""
    i = 0
    while i < len(message):
        start = i
        key, i = _read_varint(message, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _read_varint(message, i)
        elif wire == 1:
            end = i + 8
        elif wire == LENGTH_DELIMITED:
            size, i = _read_varint(message, i)
            end = i + size
        elif wire == 5:
            end = i + 4
        else:
            raise ValueError(f"not an ONNX model: protobuf wire type {wire} at byte {start}")
        if end > len(message):
            raise ValueError("not an ONNX model: truncated")
        yield number, wire, message[start:i], message[i:end]
        i = end


def _read_varint(data: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("not an ONNX model: bad varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
