"""Static int8 quantization (QDQ, per-channel) of an exported model, calibrated on real photos."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from catsdogs.contract import INPUT_NAME

log = logging.getLogger(__name__)


class PhotoCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed training photos, uint8 (N, H, W, 3), to the calibrator in batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 8) -> None:
        self.images = images
        self.batch_size = batch_size
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.images):
            return None
        chunk = self.images[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return {INPUT_NAME: chunk}

    def rewind(self) -> None:
        self.pos = 0


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
    """fp32 ONNX -> int8 QDQ ONNX: per-channel int8 weights, uint8 activations (MinMax ranges).

    ``calibration``: uint8 (N, H, W, 3) training photos made by the server's preprocessing.
    The metadata of ``fp32_path`` is not carried over; the caller writes the int8 file's own.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # graph optimisation + shape inference first, as onnxruntime recommends; the symbolic
        # shape pass needs sympy, which onnx shape inference makes unnecessary here
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # softmax stays float: quantized probabilities would be steps of 1/256 and no longer
        # sum to 1
        graph = onnx.load(str(prepared)).graph
        keep_float = [n.name for n in graph.node if n.op_type == "Softmax"]
        quantize_static(
            str(prepared),
            str(out_path),
            PhotoCalibrationReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=keep_float,
        )
    log.info("int8 model written to %s", out_path)
    return out_path
