"""Check an exported model before it is written: onnx.checker, a real onnxruntime session and parity with the
simulation (zeroquant.census says which kernels it runs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from zeroquant.errors import ModelLoadError, VerificationError, first_line
from zeroquant.quant.sim import as_outputs
from zeroquant.runtime import run_all, session


@dataclass
class Parity:
    """The ONNX model (onnxruntime, integer kernels) against the PyTorch simulation on the same images; with several
    outputs, the worst output's differences and the mean agreement (argmax over channels, at every position)."""

    images: int
    top1_agreement: float  # percent
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    relative_max_diff: float  # max difference over the spread of the simulation's values, worst output
    outputs: dict[str, dict] = field(default_factory=dict)  # per output name, when there are several

    @property
    def diverged(self) -> bool:
        """Differences beyond rounding: a logit off by more than a tenth of the logits' spread. Top-1 agreement on
        distilled images is too strict a gate, since their logits are often nearly flat."""
        return not self.relative_max_diff <= 0.1

    def to_dict(self) -> dict:
        return asdict(self)


def parity(model: onnx.ModelProto, simulation, images: torch.Tensor, names: list[str]) -> Parity:
    """The outputs of onnxruntime against the simulation's; a model onnxruntime refuses is a VerificationError."""
    try:
        loaded = session(model)
    except ModelLoadError as exc:
        raise VerificationError(f"the exported model failed verification: {exc.message}") from exc
    onnx_outputs = run_all(loaded, images.numpy())
    with torch.no_grad():
        chunks = [as_outputs(simulation(chunk)) for chunk in images.split(64)]
    sim_outputs = [torch.cat(parts).numpy() for parts in zip(*chunks)]
    rows = {}
    for name, ours, expected in zip(names, onnx_outputs, sim_outputs):
        diff = np.abs(ours - expected)
        spread = float(expected.max() - expected.min()) or 1.0
        rows[name] = {"top1_agreement": float((ours.argmax(1) == expected.argmax(1)).mean() * 100),
                      "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                      "relative_max_diff": float(diff.max()) / spread}
    values = list(rows.values())
    return Parity(len(images), float(np.mean([r["top1_agreement"] for r in values])),
                  max(r["max_abs_diff"] for r in values), float(np.mean([r["mean_abs_diff"] for r in values])),
                  max(r["relative_max_diff"] for r in values), rows if len(rows) > 1 else {})


def check(model: onnx.ModelProto) -> None:
    """onnx's checker; what it finds is a VerificationError (anything else it raises is a bug of ours)."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(f"the exported model failed onnx's checker: {first_line(exc)}") from exc
