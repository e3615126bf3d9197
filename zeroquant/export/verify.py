"""Check an exported model before it is written: onnx.checker, a real onnxruntime session and parity with the
simulation (zeroquant.census says which kernels it runs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch

from zeroquant.errors import ModelLoadError, VerificationError, first_line
from zeroquant.options import PARITY_TOLERANCE
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
    tolerance: float = PARITY_TOLERANCE  # the largest relative_max_diff that passes (--parity-tolerance)
    # only beyond the default tolerance, to say why, on the same scale as relative_max_diff: onnxruntime with no graph
    # optimisation (the file's own arithmetic, in float) against the simulation, and the simulation against the float
    # model (the quantization's own error)
    reference_relative_max_diff: float | None = None
    quantization_relative_max_diff: float | None = None

    @property
    def diverged(self) -> bool:
        """Differences beyond rounding: a logit off by more than a tenth (the tolerance) of the logits' spread. Top-1
        agreement on distilled images is too strict a gate, since their logits are often nearly flat."""
        return not self.relative_max_diff <= self.tolerance

    def diagnosis(self) -> str:
        """Why a model beyond the default tolerance differs, from the two extra runs. A model whose own quantization
        error dwarfs the difference amplifies one-step rounding differences (onnxruntime's kernels and PyTorch round a
        few ties the other way), as untrained nets do: on timm fbnetv3_b with random weights the simulation is 14x
        its logit spread from the float model. Otherwise the float run tells the file's arithmetic from the integer
        kernels."""
        reference, quantization = self.reference_relative_max_diff, self.quantization_relative_max_diff
        if quantization >= 2 * self.relative_max_diff:
            return (f"rounding alone can explain it: the simulation itself is {100 * quantization:.0f} % of that "
                    f"range from the float model, and onnxruntime's float run of the file {100 * reference:.0f} % "
                    "from the simulation, so this model amplifies one-step rounding differences (untrained weights "
                    "do; on a model this sensitive an export error would look the same)")
        if reference <= PARITY_TOLERANCE:
            return (f"onnxruntime's float run of the same file agrees with the simulation ({100 * reference:.1f} %) "
                    "but its integer kernels do not: a kernel or fusion that computes otherwise; please report it")
        return (f"onnxruntime's float run of the file differs as well ({100 * reference:.0f} %) while the "
                f"simulation is {100 * quantization:.0f} % from the float model: the file does not compute what the "
                "simulation does, an export bug; please report it")

    def to_dict(self) -> dict:
        return asdict(self)


def _compare(ours: list[np.ndarray], expected: list[np.ndarray], names: list[str]) -> dict[str, dict]:
    """Per output: argmax agreement, max and mean absolute difference, max difference over expected's spread."""
    rows = {}
    for name, mine, theirs in zip(names, ours, expected):
        diff = np.abs(mine - theirs)
        spread = float(theirs.max() - theirs.min()) or 1.0
        rows[name] = {"top1_agreement": float((mine.argmax(1) == theirs.argmax(1)).mean() * 100),
                      "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                      "relative_max_diff": float(diff.max()) / spread}
    return rows


def _outputs(module, images: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        chunks = [as_outputs(module(chunk)) for chunk in images.split(64)]
    return [torch.cat(parts).numpy() for parts in zip(*chunks)]


def parity(model: onnx.ModelProto, simulation, float_model, images: torch.Tensor, names: list[str],
           tolerance: float = PARITY_TOLERANCE) -> Parity:
    """The outputs of onnxruntime against the simulation's; a model onnxruntime refuses is a VerificationError. One
    beyond the default tolerance (refused, or accepted at a higher one) is run again without graph optimisation, and
    float_model on the images, for diagnosis()."""
    try:
        loaded = session(model)
    except ModelLoadError as exc:
        raise VerificationError(f"the exported model failed verification: {exc.message}") from exc
    expected = _outputs(simulation, images)
    rows = _compare(run_all(loaded, images.numpy()), expected, names)
    values = list(rows.values())
    check = Parity(len(images), float(np.mean([r["top1_agreement"] for r in values])),
                   max(r["max_abs_diff"] for r in values), float(np.mean([r["mean_abs_diff"] for r in values])),
                   max(r["relative_max_diff"] for r in values), rows if len(rows) > 1 else {}, tolerance)
    if check.relative_max_diff > PARITY_TOLERANCE:
        reference = run_all(session(model, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL), images.numpy())
        for attribute, outputs in (("reference_relative_max_diff", reference),
                                   ("quantization_relative_max_diff", _outputs(float_model, images))):
            setattr(check, attribute, max(r["relative_max_diff"] for r in _compare(outputs, expected, names).values()))
    return check


def check(model: onnx.ModelProto) -> None:
    """onnx's checker; what it finds is a VerificationError (anything else it raises is a bug of ours)."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(f"the exported model failed onnx's checker: {first_line(exc)}") from exc
