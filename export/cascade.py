"""A cascade as ONE ONNX file: a first model answers, more models only where it is unsure.

``make cv`` measures cascades (``cv.cascades``: ``first``, ``then``, ``below``): the first model
answers every photo, and a photo whose answer it gives a probability below ``below`` gets the
average of the ``then`` models' probabilities instead (the first's own included when it is one of
them). Each model sees the photo as it was cross-validated: its own view (input size, and the
shorter side resized to before the centre crop). This module builds that as one graph, so the
cost of a cascade is measured on the graph that would be served, not added up from its members:

- input ``image``: uint8 (N, S, S, 3), the first model's view; normalisation inside as for any
  model. Every other view (a member whose input size or resize differs from the first's) is an
  input of its own, ``image@<size>/<resize>``, read only on the escalated path: a photo's other
  views are prepared only for the few photos that escalate. Each has an empty default (0 rows):
  a caller that does not feed it gets the first model's answers, with ``escalated`` saying which
  rows want the second step (``catsdogs.cascade.two_step``);
- the first model runs on the whole batch; ``escalated`` (bool, N) flags the rows it is unsure of;
- one ONNX ``If``: when any row is unsure and every view is fed (as many rows as ``image``), its
  branch gathers those rows of each view, runs the other models on them alone, averages and
  scatters the answers back; otherwise the first's answers stand. The other models' weights
  live inside the branch, so a batch with no unsure row never touches them;
- outputs ``logits`` (log of the probabilities: their softmax gives the probabilities back),
  ``probabilities`` and ``escalated``.

Every member is exported on its own by the exporter the export stage uses, then the graphs are
joined: each member's tensors get a ``m<i>/`` prefix, the other members' nodes and weights move
into the branch, reading the gathered rows of their view instead of ``image``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from catsdogs.cascade import view_name
from catsdogs.contract import (
    CASCADE_BELOW,
    INPUT_NAME,
    OUTPUT_ESCALATED,
    OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES,
)
from catsdogs.preprocessing import PreprocessSpec
from export import onnx_tools as ox
from export.onnx_tools import ExportError
from training.models import CascadeClassifier, ImageClassifier

MIN_OPSET = 18  # ReduceMax with its axes as an input
PROBABILITY_FLOOR = 1e-30  # logits = log(max(p, floor)): finite where a probability underflows


@dataclass(frozen=True)
class Member:
    """One model of a cascade: a classifier taking uint8 NHWC at ``input_size``, the photo's
    shorter side resized to ``resize`` before the centre crop (None: the same as any member's
    of that size)."""

    name: str
    model: ImageClassifier
    input_size: int
    resize: int | None = None

    @property
    def view(self) -> tuple[int, int | None]:
        return self.input_size, self.resize

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), dim=-1)


def view_input(member: Member) -> str:
    """The graph input of a view other than the first model's."""
    return view_name(member.input_size, member.resize)


def view_inputs(first: Member, then: Sequence[Member]) -> dict[str, int]:
    """Each input past ``image`` (a view no earlier member has) -> its side, in member order."""
    return {view_input(m): m.input_size for m in then if m.view != first.view}


def reference(
    first: Member,
    then: Sequence[Member],
    below: float,
    batch: np.ndarray,
    views: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Eager PyTorch answers of the cascade: (probabilities (N, C), escalated (N,)).
    ``first`` votes on the escalated rows where it is among ``then``. ``views``: every input of
    :func:`view_inputs`, the same photos as ``batch``."""
    others = [m for m in then if m.name != first.name]
    votes = len(others) < len(then)
    wanted = view_inputs(first, then)
    if wanted and set(views or {}) != set(wanted):
        raise ValueError(f"the cascade needs the views {sorted(wanted)}, got {sorted(views or {})}")

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(a, requirements=["C", "W"]))

    own = [None if m.view == first.view else tensor(views[view_input(m)]) for m in others]  # type: ignore[index]
    model = CascadeClassifier(first.model, [m.model for m in others], below, first_votes=votes)
    with torch.inference_mode():
        probs, unsure = model.eval().probabilities(tensor(batch), own)
    return probs.numpy(), unsure.numpy()


def export_member(member: Member, path: Path, opset: int) -> onnx.ModelProto:
    """One member, uint8 (N, S, S, 3) at its own side -> ``logits``, ``probabilities``, exported
    and checked as the export stage exports any model."""
    ox.export_onnx(member.model.eval(), path, input_size=member.input_size, opset=opset)
    model = ox.check_onnx_file(path)
    if model.functions:
        raise ExportError(f"{member.name}: the exporter wrote local functions; cannot join graphs")
    return model


def prefixed(graph: onnx.GraphProto, prefix: str, rename: dict[str, str]) -> onnx.GraphProto:
    """A copy of ``graph`` with every tensor and node name prefixed, ``rename`` applied first."""

    def name(n: str) -> str:
        return rename.get(n, n if not n else prefix + n)

    out = onnx.GraphProto()
    out.CopyFrom(graph)
    for node in out.node:
        node.name = prefix + (node.name or node.op_type)
        node.input[:] = [name(i) for i in node.input]
        node.output[:] = [name(o) for o in node.output]
    for init in out.initializer:
        init.name = name(init.name)
    for info in [*out.value_info, *out.output]:
        info.name = name(info.name)
    return out


def join(
    first: onnx.ModelProto,
    others: Sequence[onnx.ModelProto],
    *,
    first_in_then: bool,
    below: float,
    inputs: Sequence[str] | None = None,
    views: Mapping[str, int] | None = None,
) -> onnx.ModelProto:
    """The cascade graph from the members' exported graphs (``image`` -> ``logits``,
    ``probabilities``). ``inputs``: the input each of ``others`` reads (``image``, or one of
    ``views``: view input -> side); None: all read ``image``."""
    n_then = len(others) + int(first_in_then)
    if n_then < 1:
        raise ValueError("a cascade needs at least one model in its second step")
    inputs = list(inputs) if inputs is not None else [INPUT_NAME] * len(others)
    views = dict(views or {})
    if len(inputs) != len(others) or not set(inputs) <= {INPUT_NAME, *views}:
        raise ValueError(f"inputs {inputs} do not match the views {sorted(views)}")
    main = prefixed(first.graph, "m0/", {INPUT_NAME: INPUT_NAME})
    p0 = f"m0/{OUTPUT_PROBABILITIES}"
    const = [
        numpy_helper.from_array(np.array([1], np.int64), "cascade/axis1"),
        numpy_helper.from_array(np.array([0], np.int64), "cascade/axis0"),
        numpy_helper.from_array(np.array(below, np.float32), CASCADE_BELOW),
        numpy_helper.from_array(np.array(PROBABILITY_FLOOR, np.float32), "cascade/floor"),
    ]
    decide = [
        helper.make_node("ReduceMax", [p0, "cascade/axis1"], ["cascade/conf"], keepdims=0),
        helper.make_node("Less", ["cascade/conf", CASCADE_BELOW], [OUTPUT_ESCALATED]),
        helper.make_node("Cast", [OUTPUT_ESCALATED], ["cascade/unsure_i"], to=TensorProto.INT32),
        helper.make_node("ReduceMax", ["cascade/unsure_i"], ["cascade/any_i"], keepdims=0),
        helper.make_node("Cast", ["cascade/any_i"], ["cascade/any"], to=TensorProto.BOOL),
    ]
    # the second step runs only with every view fed: as many rows as the image (not its default)
    condition = "cascade/any"
    if views:
        decide.append(helper.make_node("Shape", [INPUT_NAME], ["cascade/n_rows"], end=1))
    for i, name in enumerate(views):
        const.append(
            numpy_helper.from_array(np.zeros((0, views[name], views[name], 3), np.uint8), name)
        )
        decide += [
            helper.make_node("Shape", [name], [f"cascade/v{i}_rows"], end=1),
            helper.make_node(
                "Equal", [f"cascade/v{i}_rows", "cascade/n_rows"], [f"cascade/v{i}_fed1"]
            ),
            helper.make_node(
                "Squeeze", [f"cascade/v{i}_fed1", "cascade/axis0"], [f"cascade/v{i}_fed"]
            ),
            helper.make_node("And", [condition, f"cascade/v{i}_fed"], [f"cascade/go{i}"]),
        ]
        condition = f"cascade/go{i}"
    # the branch: the unsure rows gathered, the other members on them, averaged, scattered back
    nodes = [
        helper.make_node("NonZero", [OUTPUT_ESCALATED], ["cascade/nz"]),  # (1, K)
        helper.make_node("Squeeze", ["cascade/nz", "cascade/axis0"], ["cascade/rows"]),  # (K,)
        helper.make_node("Transpose", ["cascade/nz"], ["cascade/idx"], perm=[1, 0]),  # (K, 1)
    ]
    gathered = {}
    for name in dict.fromkeys(inputs):
        gathered[name] = "cascade/sub" if name == INPUT_NAME else f"cascade/sub:{name}"
        nodes.append(helper.make_node("Gather", [name, "cascade/rows"], [gathered[name]], axis=0))
    inits = [numpy_helper.from_array(np.array(n_then, np.float32), "cascade/n")]
    terms = []
    if first_in_then:
        nodes.append(helper.make_node("Gather", [p0, "cascade/rows"], ["cascade/p0_rows"], axis=0))
        terms.append("cascade/p0_rows")
    for i, (other, source) in enumerate(zip(others, inputs, strict=True), start=1):
        g = prefixed(other.graph, f"m{i}/", {INPUT_NAME: gathered[source]})
        nodes.extend(g.node)
        inits.extend(g.initializer)
        terms.append(f"m{i}/{OUTPUT_PROBABILITIES}")
    nodes += [
        helper.make_node("Sum", terms, ["cascade/total"]),
        helper.make_node("Div", ["cascade/total", "cascade/n"], ["cascade/avg"]),
        helper.make_node("ScatterND", [p0, "cascade/idx", "cascade/avg"], ["cascade/then"]),
    ]
    any_shape = helper.make_tensor_value_info
    then_branch = helper.make_graph(
        nodes, "escalate", [], [any_shape("cascade/then", TensorProto.FLOAT, None)], inits
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", [p0], ["cascade/sure"])],
        "sure",
        [],
        [any_shape("cascade/sure", TensorProto.FLOAT, None)],
    )
    n_classes = first.graph.output[1].type.tensor_type.shape.dim[1].dim_value  # probabilities
    answer = [
        helper.make_node(
            "If",
            [condition],
            [OUTPUT_PROBABILITIES],
            then_branch=then_branch,
            else_branch=else_branch,
        ),
        helper.make_node("Max", [OUTPUT_PROBABILITIES, "cascade/floor"], ["cascade/floored"]),
        helper.make_node("Log", ["cascade/floored"], [OUTPUT_LOGITS]),
    ]
    outputs = [
        any_shape(OUTPUT_LOGITS, TensorProto.FLOAT, ["batch", n_classes]),
        any_shape(OUTPUT_PROBABILITIES, TensorProto.FLOAT, ["batch", n_classes]),
        any_shape(OUTPUT_ESCALATED, TensorProto.BOOL, ["batch"]),
    ]
    view_infos = [
        any_shape(name, TensorProto.UINT8, [f"rows{i}", side, side, 3])
        for i, (name, side) in enumerate(views.items())
    ]
    graph = helper.make_graph(
        [*main.node, *decide, *answer],
        "cascade",
        [
            first.graph.input[0],
            *view_infos,
            helper.make_tensor_value_info(CASCADE_BELOW, TensorProto.FLOAT, []),
        ],
        outputs,
        [*main.initializer, *const],
        value_info=list(main.value_info),
    )
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model = helper.make_model(graph, opset_imports=first.opset_import, ir_version=first.ir_version)
    onnx.checker.check_model(model)
    return model


def export_cascade(
    first: Member,
    then: Sequence[Member],
    below: float,
    path: Path,
    *,
    opset: int,
) -> Path:
    """Write the cascade's ONE ``.onnx`` file (weights inside); ``then`` may include ``first``.
    A member whose view differs from the first's reads an input of its own (:func:`view_inputs`)."""
    if opset < MIN_OPSET:
        raise ValueError(f"a cascade needs opset >= {MIN_OPSET}, got {opset}")
    if not 0.0 <= below <= 1.0 + 1e-6:
        raise ValueError(f"below must be a probability, got {below}")
    others = [m for m in then if m.name != first.name]
    with tempfile.TemporaryDirectory() as tmp:
        graphs = [
            export_member(m, Path(tmp) / f"m{i}.onnx", opset)
            for i, m in enumerate([first, *others])
        ]
    model = join(
        graphs[0],
        graphs[1:],
        first_in_then=len(others) < len(then),
        below=below,
        inputs=[INPUT_NAME if m.view == first.view else view_input(m) for m in others],
        views=view_inputs(first, then),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=False)
    return path


def with_threshold(model: onnx.ModelProto, below: float) -> bytes:
    """The same cascade with another threshold, serialised (for an onnxruntime session):
    ``below`` 0 never escalates, anything over 1 always does."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        if init.name == CASCADE_BELOW:
            init.CopyFrom(numpy_helper.from_array(np.array(below, np.float32), CASCADE_BELOW))
            return copy.SerializeToString()
    raise ExportError(f"not a cascade graph: no {CASCADE_BELOW!r} initializer")


def export_trained_cascade(
    cascade: CascadeClassifier, path: Path, *, spec: PreprocessSpec, opset: int
) -> Path:
    """A trained cascade (``training.models.CascadeClassifier``) as one file: its first model's
    answer is in the average. ``spec``: the first model's view. Its other models take that
    input too (resizing it inside themselves), or their own views (``cascade.views``)."""
    first = Member("m0", cascade.first, spec.input_size, spec.resize)
    views = cascade.views or [spec] * len(cascade.others)
    others = [
        Member(f"m{i}", m, v.input_size, v.resize)
        for i, (m, v) in enumerate(zip(cascade.others, views, strict=True), start=1)
    ]
    return export_cascade(first, [first, *others], cascade.below, path, opset=opset)


def trained_views(cascade: CascadeClassifier, spec: PreprocessSpec) -> dict[str, PreprocessSpec]:
    """The view inputs of ``export_trained_cascade``'s file -> their preprocessing ({}: every
    model on ``image``)."""
    return {
        view_name(v.input_size, v.resize): v
        for v in cascade.views or []
        if (v.input_size, v.resize) != (spec.input_size, spec.resize)
    }
