"""Top-1/top-5 accuracy and agreement of ONNX classifiers on an ImageSet, with onnxruntime on CPU."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from zeroquant.errors import ModelLoadError, UsageError

if TYPE_CHECKING:  # datasets imports torchvision, which quantize and bench do not need
    from zeroquant.evaluate.datasets import ImageSet


@dataclass
class EvalResult:
    n: int
    top1: float  # percent of labelled images; NaN when none is labelled
    top5: float  # percent
    agreement: float | None  # percent of top-1 predictions equal to the reference model's
    images_per_s: float

    def to_dict(self) -> dict:
        """JSON-safe: NaN (no labels) becomes None."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def onnx_session(path: str | Path, threads: int | None = None, spinning: bool = True,
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A CPU session; spinning=False lets idle intra-op workers sleep (for sessions timed interleaved)."""
    options = options or ort.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if not Path(path).is_file():
        raise ModelLoadError(f"ONNX model not found: {path}")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own (unexported) exception types
        raise ModelLoadError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from e


def predict_onnx(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for NCHW images. A model exported with a fixed batch size is fed that many at a time (zero-padded)."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        expects = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in inputs)
        raise UsageError(f"model must take one float tensor, it expects {expects}")
    name, shape = inputs[0].name, inputs[0].shape
    if len(shape) != images.ndim or any(isinstance(d, int) and d != s for d, s in zip(shape[1:], images.shape[1:])):
        raise UsageError(f"model input '{name}' expects shape {shape}, images have shape {list(images.shape)}")
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    step = fixed or batch_size
    out = []
    for start in range(0, len(images), step):
        batch = np.ascontiguousarray(images[start : start + step], dtype=np.float32)
        n = len(batch)
        if fixed and n < fixed:
            batch = np.concatenate([batch, np.zeros((fixed - n, *batch.shape[1:]), np.float32)])
        out.append(session.run(None, {name: batch})[0][:n])
    return np.concatenate(out).astype(np.float32, copy=False)


def evaluate_logits(
    logits: np.ndarray, labels: np.ndarray, reference_logits: np.ndarray | None = None
) -> tuple[float, float, float | None]:
    """(top1, top5, agreement) in percent. Accuracy counts only images with a label (>= 0); ties rank the lower
    class first (stable argsort), the same as argmax."""
    ranked = np.argsort(-logits, axis=1, kind="stable")
    known = labels >= 0
    if known.any():
        hits = ranked[known] == labels[known, None]
        top1 = 100.0 * hits[:, 0].mean()
        top5 = 100.0 * hits[:, :5].any(axis=1).mean()
    else:
        top1 = top5 = math.nan
    agreement = None
    if reference_logits is not None:
        agreement = 100.0 * float((ranked[:, 0] == reference_logits.argmax(axis=1)).mean())
    return float(top1), float(top5), agreement


def evaluate_onnx(
    model_path: str | Path,
    data: ImageSet,
    reference_path: str | Path | None = None,
    batch_size: int = 64,
    threads: int | None = None,
) -> EvalResult:
    """Accuracy of one ONNX model, and how often it agrees with a reference (e.g. the FP32 model it came from)."""
    session = onnx_session(model_path, threads)
    start = time.perf_counter()
    logits = predict_onnx(session, data.images, batch_size)
    elapsed = time.perf_counter() - start
    reference = None
    if reference_path is not None:
        reference = predict_onnx(onnx_session(reference_path, threads), data.images, batch_size)
    top1, top5, agreement = evaluate_logits(logits, data.labels, reference)
    return EvalResult(len(data.labels), top1, top5, agreement, len(data.labels) / elapsed)
