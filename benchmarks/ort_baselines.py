"""onnxruntime's own quantizers, as the baselines zeroquant is compared with. Each returns its wall time (s).

Both start with onnxruntime's quant_pre_process (shape inference + graph clean-up). Measured on ResNet-20:
quantize_dynamic fails on zeroquant's FP32 export without it (a shape-inference conflict), while quantize_static
gives the same accuracy with or without it; so both baselines use it, and its time is counted.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process


class ArrayReader(CalibrationDataReader):
    """Feeds NCHW float32 images in batches (MinMax ranges do not depend on the batching)."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 32):
        self.batches = iter([{input_name: np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)}
                             for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def _preprocessed(fp32: Path, folder: str) -> Path:
    """quant_pre_process; for a graph its symbolic shape inference cannot finish (HRNet's), without that step, as
    onnxruntime's own option allows (ONNX shape inference and the graph clean-up still run). It runs inside `folder`:
    onnxruntime leaves its shape-inference scratch files in the working directory."""
    path = Path(folder) / "preprocessed.onnx"
    fp32 = fp32.resolve()
    with contextlib.chdir(folder):
        try:
            quant_pre_process(str(fp32), str(path))
        except Exception as exc:
            if "symbolic shape inference" not in str(exc):
                raise
            quant_pre_process(str(fp32), str(path), skip_symbolic_shape=True)
    return path


def _input_name(path: str | Path) -> str:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in initializers)


def ort_dynamic(fp32: str | Path, output: str | Path) -> float:
    """quantize_dynamic with its defaults (int8 weights; activations quantized at run time)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(_preprocessed(Path(fp32), tmp), Path(output), weight_type=QuantType.QInt8)
    return time.perf_counter() - start


def ort_static(fp32: str | Path, output: str | Path, images: np.ndarray, reduce_range: bool = False) -> float:
    """quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax ranges calibrated on `images`."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(_preprocessed(Path(fp32), tmp), Path(output), ArrayReader(_input_name(fp32), images),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - start
