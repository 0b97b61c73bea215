"""A cascade as ONE ONNX file: a first model answers, more models only where it is unsure.

``make cv`` measures cascades (``cv.cascades``: ``first``, ``then``, ``below``): the first model
answers every photo, and a photo whose answer it gives a probability below ``below`` gets the
average of the ``then`` models' probabilities instead (the first's own included when it is one of
them). This module builds that as one graph, so the cost of a cascade is measured on the graph
that would be served, not added up from its members:

- input ``image``: uint8 (N, S, S, 3), S the largest member input size (the same centre crop at
  every size, see ``catsdogs.preprocessing``); a member trained at a smaller size gets its view
  resized inside the graph (bilinear, antialiased), normalisation inside as for any model;
- the first model runs on the whole batch; ``escalated`` (bool, N) flags the rows it is unsure of;
- one ONNX ``If``: when any row is unsure, its branch gathers those rows, runs the other models
  on them alone, averages and scatters the answers back; otherwise the first's answers stand.
  The other models' weights live inside the branch, so a batch with no unsure row never touches
  them;
- outputs ``logits`` (log of the probabilities: their softmax gives the probabilities back),
  ``probabilities`` and ``escalated``.

Every member is exported on its own by the exporter the export stage uses, then the graphs are
joined: each member's tensors get a ``m<i>/`` prefix, the other members' nodes and weights move
into the branch, reading the gathered rows instead of ``image``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from catsdogs.contract import (
    CASCADE_BELOW,
    INPUT_NAME,
    OUTPUT_ESCALATED,
    OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES,
)
from export import onnx_tools as ox
from export.onnx_tools import ExportError
from training.models import CascadeClassifier, ImageClassifier, resize_view

MIN_OPSET = 18  # ReduceMax with its axes as an input
PROBABILITY_FLOOR = 1e-30  # logits = log(max(p, floor)): finite where a probability underflows


@dataclass(frozen=True)
class Member:
    """One model of a cascade: a classifier taking uint8 NHWC at ``input_size``."""

    name: str
    model: ImageClassifier
    input_size: int


class MemberView(nn.Module):
    """uint8 (N, S, S, 3) -> the member's logits (N, C), its own size resized in-graph.

    A member built with a ``network_size`` already takes S and resizes inside itself."""

    def __init__(self, member: Member, source_size: int) -> None:
        super().__init__()
        if member.input_size > source_size:
            raise ValueError(f"{member.name}: input {member.input_size} > cascade {source_size}")
        self.model = member.model
        self.size = member.input_size
        self.resize = member.input_size != source_size
        if self.resize and member.model.normalize.resize_to is not None:
            raise ValueError(f"{member.name}: resizes its input already; give it the cascade's")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not self.resize:  # the model takes the cascade's input (resizing inside if it must)
            return self.model(image)
        x = resize_view(image.permute(0, 3, 1, 2).to(torch.float32), self.size)
        norm = self.model.normalize
        return self.model.head(self.model.backbone((x - norm.shift) * norm.scale))

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(image), dim=-1)


def input_size(first: Member, then: Sequence[Member]) -> int:
    return max(m.input_size for m in [first, *then])


def reference(
    first: Member, then: Sequence[Member], below: float, batch: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Eager PyTorch answers of the cascade: (probabilities (N, C), escalated (N,)).
    ``first`` votes on the escalated rows where it is among ``then``."""
    size = input_size(first, then)
    others = [MemberView(m, size) for m in then if m.name != first.name]
    votes = len(others) < len(then)
    model = CascadeClassifier(MemberView(first, size), others, below, first_votes=votes).eval()
    with torch.inference_mode():
        probs, unsure = model.probabilities(
            torch.from_numpy(np.require(batch, requirements=["C", "W"]))
        )
    return probs.numpy(), unsure.numpy()


def export_member(member: Member, source_size: int, path: Path, opset: int) -> onnx.ModelProto:
    """One member, uint8 (N, S, S, 3) -> ``logits``, ``probabilities``, exported and checked as
    the export stage exports any model."""
    view = MemberView(member, source_size).eval()
    ox.export_onnx(view, path, input_size=source_size, opset=opset)
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
) -> onnx.ModelProto:
    """The cascade graph from the members' exported graphs (``image`` -> ``logits``,
    ``probabilities``)."""
    n_then = len(others) + int(first_in_then)
    if n_then < 1:
        raise ValueError("a cascade needs at least one model in its second step")
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
    # the branch: the unsure rows gathered, the other members on them, averaged, scattered back
    nodes = [
        helper.make_node("NonZero", [OUTPUT_ESCALATED], ["cascade/nz"]),  # (1, K)
        helper.make_node("Squeeze", ["cascade/nz", "cascade/axis0"], ["cascade/rows"]),  # (K,)
        helper.make_node("Transpose", ["cascade/nz"], ["cascade/idx"], perm=[1, 0]),  # (K, 1)
        helper.make_node("Gather", [INPUT_NAME, "cascade/rows"], ["cascade/sub"], axis=0),
    ]
    inits = [numpy_helper.from_array(np.array(n_then, np.float32), "cascade/n")]
    terms = []
    if first_in_then:
        nodes.append(helper.make_node("Gather", [p0, "cascade/rows"], ["cascade/p0_rows"], axis=0))
        terms.append("cascade/p0_rows")
    for i, other in enumerate(others, start=1):
        g = prefixed(other.graph, f"m{i}/", {INPUT_NAME: "cascade/sub"})
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
            ["cascade/any"],
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
    graph = helper.make_graph(
        [*main.node, *decide, *answer],
        "cascade",
        [first.graph.input[0], helper.make_tensor_value_info(CASCADE_BELOW, TensorProto.FLOAT, [])],
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
    """Write the cascade's ONE ``.onnx`` file (weights inside); ``then`` may include ``first``."""
    if opset < MIN_OPSET:
        raise ValueError(f"a cascade needs opset >= {MIN_OPSET}, got {opset}")
    if not 0.0 <= below <= 1.0 + 1e-6:
        raise ValueError(f"below must be a probability, got {below}")
    size = input_size(first, then)
    others = [m for m in then if m.name != first.name]
    with tempfile.TemporaryDirectory() as tmp:
        graphs = [
            export_member(m, size, Path(tmp) / f"m{i}.onnx", opset)
            for i, m in enumerate([first, *others])
        ]
    model = join(graphs[0], graphs[1:], first_in_then=len(others) < len(then), below=below)
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
    cascade: CascadeClassifier, path: Path, *, input_size: int, opset: int
) -> Path:
    """A trained cascade (``training.models.CascadeClassifier``: every model takes the same
    input, resizing it inside itself) as one file: its first model's answer is in the average."""
    first = Member("m0", cascade.first, input_size)
    others = [Member(f"m{i}", m, input_size) for i, m in enumerate(cascade.others, start=1)]
    return export_cascade(first, [first, *others], cascade.below, path, opset=opset)
