"""Top-1/top-5 accuracy and agreement of ONNX classifiers on an ImageSet, with onnxruntime on CPU."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from zeroquant.errors import UsageError
from zeroquant.runtime import predict, session

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


def require_classifier(model, path) -> None:
    """eval measures top-1/top-5, which needs one [batch, classes] output; other models get a clear refusal."""
    outputs = model.get_outputs()
    if len(outputs) != 1 or len(outputs[0].shape) != 2:
        shapes = ", ".join(f"{o.name} {o.shape}" for o in outputs)
        raise UsageError(f"eval measures classifiers (one [batch, classes] output); {path} has {shapes}",
                         "compare its outputs with the float model's in your own metric (e.g. mIoU)")


def evaluate_onnx(
    model_path: str | Path,
    data: ImageSet,
    reference_path: str | Path | None = None,
    batch_size: int = 64,
    threads: int | None = None,
) -> EvalResult:
    """Accuracy of one ONNX model, and how often it agrees with a reference (e.g. the FP32 model it came from)."""
    model = session(model_path, threads)
    require_classifier(model, model_path)
    start = time.perf_counter()
    logits = predict(model, data.images, batch_size)
    elapsed = time.perf_counter() - start
    reference = None
    if reference_path is not None:
        reference = predict(session(reference_path, threads), data.images, batch_size)
    top1, top5, agreement = evaluate_logits(logits, data.labels, reference)
    return EvalResult(len(data.labels), top1, top5, agreement, len(data.labels) / elapsed)
