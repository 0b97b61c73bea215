"""A tiny ONNX model that honours the serving contract, for the load tooling and the test suites.

It is not a classifier worth anything: the mean colour of the picture times a fixed 3xC matrix,
so mostly red -> the first class, mostly blue -> the second. But it has the real interface
(uint8 NHWC ``image`` with a symbolic batch, ``logits`` and ``probabilities``, the contract in
``metadata_props``), so a real server can load it in a second. Needs onnx and numpy only.

    python -m loadtest.tiny_model /tmp/tiny.onnx
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from catsdogs.contract import INPUT_NAME, OUTPUT_LOGITS, OUTPUT_PROBABILITIES, ModelContract
from catsdogs.preprocessing import PreprocessSpec


def tiny_contract(
    input_size: int = 32, class_names: tuple[str, ...] = ("cat", "dog")
) -> ModelContract:
    spec = PreprocessSpec(input_size=input_size, resize=input_size + input_size // 8)
    return ModelContract(
        class_names=class_names,
        input_size=input_size,
        preprocessing=spec,
        model_name="tiny_mean_colour",
        model_version="tiny-0",
        mlflow_run_id="none",
        git_commit="none",
        data_version="none",
        exported_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        extra={"quantization": "none", "metrics": {}},
    )


def build_tiny_model(contract: ModelContract) -> onnx.ModelProto:
    """uint8 (N, S, S, 3) -> mean colour (N, 3) -> logits (N, C) -> softmax (N, C)."""
    n_classes = len(contract.class_names)
    size = contract.input_size
    # class 0 scores red minus blue, class 1 blue minus red (and so on, alternating)
    red_minus_blue = np.array([0.005, 0.0, -0.005], dtype=np.float32)
    weights = np.stack([red_minus_blue * (-1) ** c for c in range(n_classes)], axis=1)  # (3, C)
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2], keepdims=0),  # (N, 3)
        helper.make_node("MatMul", ["mean", "weights"], [OUTPUT_LOGITS]),
        helper.make_node("Softmax", [OUTPUT_LOGITS], [OUTPUT_PROBABILITIES], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        contract.model_name,
        inputs=[
            helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", size, size, 3])
        ],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_LOGITS, TensorProto.FLOAT, ["batch", n_classes]),
            helper.make_tensor_value_info(
                OUTPUT_PROBABILITIES, TensorProto.FLOAT, ["batch", n_classes]
            ),
        ],
        initializer=[numpy_helper.from_array(weights, "weights")],
    )
    # opset 17: the last one where ReduceMean takes `axes` as an attribute
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    helper.set_model_props(model, contract.to_metadata())
    onnx.checker.check_model(model)
    return model


def write_tiny_model(
    path: Path, input_size: int = 32, contract: ModelContract | None = None
) -> Path:
    """Save the tiny model for ``contract`` (by default :func:`tiny_contract` of that size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_tiny_model(contract or tiny_contract(input_size)), str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--input-size", type=int, default=32)
    args = parser.parse_args()
    write_tiny_model(args.out, args.input_size)


if __name__ == "__main__":
    main()
