"""A tiny ONNX model that honours the serving contract, for exercising the load tooling.

It is not a classifier worth anything: the mean colour of the picture times a fixed 3x2 matrix.
But it has the real interface (uint8 NHWC ``image`` with a symbolic batch, ``logits`` and
``probabilities``, the contract in ``metadata_props``), so a real server can load it in a second.

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
    rng = np.random.default_rng(0)
    weight = rng.normal(0.0, 0.05, size=(3, n_classes)).astype(np.float32)
    bias = np.zeros(n_classes, dtype=np.float32)
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["colour"], axes=[1, 2], keepdims=0),  # (N, 3)
        helper.make_node("Gemm", ["colour", "weight", "bias"], [OUTPUT_LOGITS]),
        helper.make_node("Softmax", [OUTPUT_LOGITS], [OUTPUT_PROBABILITIES], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        inputs=[
            helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", size, size, 3])
        ],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_LOGITS, TensorProto.FLOAT, ["batch", n_classes]),
            helper.make_tensor_value_info(
                OUTPUT_PROBABILITIES, TensorProto.FLOAT, ["batch", n_classes]
            ),
        ],
        initializer=[
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    # opset 17: the last one where ReduceMean takes `axes` as an attribute
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, contract.to_metadata())
    onnx.checker.check_model(model)
    return model


def write_tiny_model(path: Path, input_size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_tiny_model(tiny_contract(input_size)), str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--input-size", type=int, default=32)
    args = parser.parse_args()
    write_tiny_model(args.out, args.input_size)


if __name__ == "__main__":
    main()
