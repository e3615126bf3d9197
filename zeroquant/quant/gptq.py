"""Second-order weight rounding (GPTQ, Frantar et al. 2023; OBQ before it): per layer, the Hessian H = X X^T of the
layer's inputs on the calibration images decides how each weight's rounding error is compensated by the weights not
yet rounded, column by column, so that the layer's output (not its weights) stays close to the float one. It costs a
forward pass and a Cholesky factorisation per layer: seconds, where block reconstruction costs minutes per block on a
CPU, and it can be reconstruction's starting point.

Layers go in graph order and each sees the inputs the model so far produces with everything before it quantized
(weights and activations), as it will at run time. Those inputs x~ have drifted from the float model's x, so the
layer's target is the float model's output W x, not W x~ (asymmetric calibration, GPTAQ: Li et al. 2025): a ridge
regression fits weights and a bias shift that reproduce W x from [x~, 1], and that fit is what GPTQ rounds; the
rounding's mean error on x~ goes into the bias as well, so bias correction leaves such a layer alone. Grouped and
depthwise convs solve one small problem per group, batched. The per-channel step sizes are chosen first (a search
over clipping ratios of each channel's range that minimises the H-weighted error, i.e. the output error, of plain
rounding), then kept fixed while GPTQ rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zeroquant.progress import SILENT, Progress
from zeroquant.quant.quantizers import QuantizedLayer, symmetric_scales
from zeroquant.quant.sim import QuantSim

DAMPING = 0.01  # of the mean diagonal, added to H: keeps the factorisation stable for nearly dead inputs
CLIP_RATIOS = torch.linspace(1.0, 0.5, 26)  # candidate fractions of each channel's |w| max, for the step-size search
CHUNK = 4  # images per pass when collecting H (unfolded 3x3 inputs are 9x the activation)
# Input vectors per weight column below which H is too poorly sampled to trust its off-diagonal terms: GPTQ then fits
# the few calibration inputs instead of the layer (measured on Lite0's classifier, 32 vectors for 1280 columns, and
# its last 1x1 convs: KL to FP32 on real photos 10x that of nearest rounding). Such layers keep nearest rounding.
MIN_SAMPLES_PER_COLUMN = 2.0
# The float-target fit's ridge, of the mean diagonal of H, pulling it towards the layer's own weights and bias. With
# 32 images the fit without it follows those images: on EfficientNet-Lite0 W4A8 (calibration only, scored on 250
# photos no run saw) KL to FP32 0.134 at 0.01, 0.118 at 0.1, 0.101 at 1 and 0.115 at 10 with real calibration photos
# (0.120 without the fit); 0.185 / 0.152 / 0.215 at 0.1 / 1 / 10 with distilled images (0.191 without); ResNet-20
# W4A4 gained 1.7-1.9 points at 0.1 and 1 with distilled images. benchmarks/RESULTS.md, "GPTQ towards the float
# model". None: plain GPTQ, towards W x~ (benchmarks/data_quality.py --target-ridge none, for that comparison).
TARGET_RIDGE: float | None = 1.0


@dataclass
class FloatTarget:
    """The layer's inputs as the quantized model feeds them (x~) against the float model's (x), each with a constant
    1 appended (the bias's input); means over images of sums over positions, [groups, d + 1, d + 1]."""
    quantized: torch.Tensor  # [x~, 1] [x~, 1]^T
    cross: torch.Tensor  # [x, 1] [x~, 1]^T


@dataclass
class InputHessian:
    matrix: torch.Tensor  # [groups, d, d]: mean over images of the sum over positions of x x^T
    samples: int  # input vectors (images x output positions) it was summed over
    target: FloatTarget | None = None  # where the layer is fitted to the float model's output

    @property
    def well_sampled(self) -> bool:
        return self.samples >= MIN_SAMPLES_PER_COLUMN * self.matrix.shape[-1]


ROUNDINGS = ("auto", "nearest", "gptq")


def uses_gptq(rounding: str, bits: int) -> bool:
    """Whether the `rounding` option rounds weights of `bits` bits by GPTQ when each layer is weighed alone (the
    sensitivity search): auto does below 8 bits."""
    return rounding == "gptq" or (rounding == "auto" and bits < 8)


def gptq_layers(sim: QuantSim, rounding: str) -> list[str]:
    """The layers of `sim` that the `rounding` option rounds by GPTQ: all of them, or with auto all of a model with
    any weight or activation below 8 bits and none of a W8A8 one. The 8-bit layers of a low-bit model (depthwise,
    first and last) read inputs that the low-bit ones moved, and the float-target fit brings them back: EfficientNet-
    Lite0 W4A8 on the 500 photos, 85.6 % top-1 and 91.0 % agreement against 81.6 / 87.8 with GPTQ on its 4-bit layers
    only (FP32 88.2). A W8A8 model gains less for 4x the rounding time: Lite0 99.4 % agreement against nearest
    rounding's 98.8, 109 s against 25 s with cached images (`--rounding gptq` asks for it)."""
    rounds_all = min(sim.fewest_bits()) < 8 if rounding == "auto" else rounding == "gptq"
    return list(sim.layers) if rounds_all else []


class _Stop(Exception):
    """Raised by the hook once the layer's inputs are collected: the rest of the network need not run."""


def gptq(sim: QuantSim, images: torch.Tensor, layers: list[str] | None = None, search_scales: bool = True,
         progress: Progress = SILENT) -> list[dict]:
    """Round the weights of `layers` (all by default) in graph order; returns per layer the output error of plain
    rounding and of GPTQ's, relative to the output's energy, on the calibration images (for the report)."""
    names = [n for n in sim.layers if layers is None or n in layers]
    summary = []
    with progress.stage("second-order rounding (GPTQ)", total=len(names)) as advance:
        for name in names:
            layer = sim.layers[name]
            inputs = hessian(sim, layer, images, float_target=TARGET_RIDGE is not None)
            summary.append(round_layer(layer, inputs, search_scales))
            advance()
    return summary


def round_layer(layer: QuantizedLayer, inputs: InputHessian, search_scales: bool = True) -> dict:
    """GPTQ for one layer at its current bits, given the Hessian of its inputs: sets its step sizes and, where it
    lowers the output error, its rounding (round_from); with a float target, fits the weights and bias to it first.
    Returns both errors (of the target's rounding). A poorly sampled Hessian leaves the layer to nearest rounding."""
    weight, h = _grouped(layer), inputs.matrix
    if not inputs.well_sampled:
        error = _output_error(weight, _rounded(weight, layer), h)
        return {"layer": layer.name, "error_nearest": error, "error_gptq": error, "skipped": "too few samples"}
    shift = None
    if inputs.target is not None:
        weight, shift = _fit_float_target(weight, inputs.target)
        layer.round_from = _ungrouped(weight, layer)  # the fit is what even nearest rounding rounds
    if search_scales:
        layer.set_weight_scale(_best_scales(weight, h, layer))
    before = _output_error(weight, _rounded(weight, layer), h)
    compensated = _gptq_groups(weight, h, layer)
    after = _output_error(weight, _rounded(compensated, layer), h)
    if after < before:  # never worse than nearest rounding on the calibration images
        layer.round_from = _ungrouped(compensated, layer)
    if shift is not None:
        inputs_mean = inputs.target.quantized[:, :-1, -1] / inputs.target.quantized[:, -1:, -1]  # E[x~], [groups, d]
        final = _rounded(_grouped(layer, layer.rounded_weights()), layer)
        shift = shift + torch.einsum("grd,gd->gr", weight - final, inputs_mean)
        layer.bias_shift = shift.reshape(-1).to(layer.bias_shift.dtype)  # GPTQ comes before any bias correction
        layer.bias_fitted = True
        layer.refresh_bias()
    return {"layer": layer.name, "error_nearest": before, "error_gptq": min(before, after)}


def _fit_float_target(weight: torch.Tensor, target: FloatTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights [groups, rows, d] and bias shift [groups, rows] whose output on x~ is closest to W x in the least
    squares sense, ridge-pulled towards W and no shift: [W, 0] (C + r I) (H~ + r I)^-1."""
    quantized = target.quantized
    size = quantized.shape[-1]
    ridge = TARGET_RIDGE * torch.diagonal(quantized, dim1=1, dim2=2).mean(1).reshape(-1, 1, 1)
    ridge = ridge * torch.eye(size, dtype=quantized.dtype)
    extended = torch.cat([weight, torch.zeros_like(weight[:, :, :1])], 2)
    fitted = torch.linalg.solve(quantized + ridge, (target.cross + ridge).transpose(1, 2) @ extended.transpose(1, 2))
    fitted = fitted.transpose(1, 2)  # solved transposed: (H~ + r I) Y^T = (C + r I)^T [W, 0]^T, H~ symmetric
    return fitted[:, :, :-1], fitted[:, :, -1]


def hessian(sim: QuantSim, layer: QuantizedLayer, images: torch.Tensor, float_target: bool = False) -> InputHessian:
    """H of the layer's (unfolded, per group) inputs x as the simulation is configured (quantized before the layer,
    or float for sensitivity); with `float_target`, also what the float model feeds the layer (FloatTarget)."""
    sums, samples, seen = {}, 0, []

    def add(key, product):
        sums[key] = product if key not in sums else sums[key] + product

    def collect(module, args):
        nonlocal samples
        columns = _columns(module, args[0].detach().double())
        samples += columns.shape[2]
        if float_target:
            columns = _with_bias_input(columns)
            seen.append(columns)
        add("quantized", columns @ columns.transpose(1, 2))
        raise _Stop

    def collect_float(module, args):
        columns = _columns(module, args[0].detach().double())
        add("cross", _with_bias_input(columns) @ seen.pop().transpose(1, 2))
        raise _Stop

    with torch.no_grad():
        for chunk in images.split(CHUNK):
            _run_until(sim, layer, collect, chunk)
            if float_target:
                with sim.float_pass():
                    _run_until(sim, layer, collect_float, chunk)
    means = {key: total / len(images) for key, total in sums.items()}
    if not float_target:
        return InputHessian(means["quantized"], samples)
    target = FloatTarget(means["quantized"], means["cross"])
    return InputHessian(target.quantized[:, :-1, :-1], samples, target)


def _with_bias_input(columns: torch.Tensor) -> torch.Tensor:
    """[groups, d, positions] -> [groups, d + 1, positions]: a constant 1 appended, the input the bias multiplies."""
    return torch.cat([columns, torch.ones_like(columns[:, :1])], 1)


def _run_until(sim: QuantSim, layer: QuantizedLayer, hook, images: torch.Tensor) -> None:
    """Run the simulation on `images` until `hook` has seen the layer's input (it raises _Stop)."""
    handle = layer.register_forward_pre_hook(hook)
    try:
        sim(images)
    except _Stop:
        pass
    finally:
        handle.remove()


def _columns(layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as one column per output position: [groups, d, positions]."""
    if layer.kind == "linear":
        return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)
    stride, padding, dilation, groups = layer.conv_args
    kernel = layer.weight.shape[2:]
    if isinstance(padding, str):
        raise ValueError("string padding")  # aten.conv2d from torch.export carries explicit padding
    unfolded = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*k*k, L]
    n, _, positions = unfolded.shape
    unfolded = unfolded.reshape(n, groups, -1, positions)
    return unfolded.permute(1, 2, 0, 3).reshape(groups, -1, n * positions)


def _grouped(layer: QuantizedLayer, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The float weights (or `weight`, of their shape) as [groups, rows per group, d]."""
    groups = layer.conv_args[3] if layer.kind == "conv" else 1
    weight = layer.weight if weight is None else weight
    return weight.detach().double().reshape(groups, layer.weight.shape[0] // groups, -1)


def _ungrouped(weight: torch.Tensor, layer: QuantizedLayer) -> torch.Tensor:
    return weight.reshape(layer.weight.shape).to(layer.weight.dtype)


def _group_scales(layer: QuantizedLayer, scale: torch.Tensor | None = None) -> torch.Tensor:
    scale = layer.weight_scale if scale is None else scale
    groups = layer.conv_args[3] if layer.kind == "conv" else 1
    return scale.double().reshape(groups, -1, 1)


def _rounded(weight: torch.Tensor, layer: QuantizedLayer, scale: torch.Tensor | None = None) -> torch.Tensor:
    step = _group_scales(layer, scale)
    return (weight / step).round().clamp(-layer.qmax, layer.qmax) * step


def _output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H E^T) / tr(W H W^T): the output's squared error relative to its energy."""
    error = weight - rounded
    energy = torch.einsum("grd,gde,gre->", weight, hessian, weight)
    return float(torch.einsum("grd,gde,gre->", error, hessian, error) / energy.clamp_min(1e-30))


def _best_scales(weight: torch.Tensor, hessian: torch.Tensor, layer: QuantizedLayer) -> torch.Tensor:
    """Per channel, the clipping ratio of |w| max whose plain rounding gives the least output error."""
    absmax = weight.abs().amax(2).reshape(-1)
    best, best_error = None, None
    for ratio in CLIP_RATIOS.tolist():
        scale = symmetric_scales(absmax * ratio, layer.qmax)
        error = weight - _rounded(weight, layer, scale)
        per_row = torch.einsum("grd,gde,gre->gr", error, hessian, error).reshape(-1)
        if best is None:
            best, best_error = scale.clone(), per_row
        else:
            better = per_row < best_error
            best[better], best_error = scale[better], torch.where(better, per_row, best_error)
    return best


def _gptq_groups(weight: torch.Tensor, hessian: torch.Tensor, layer: QuantizedLayer) -> torch.Tensor:
    """GPTQ's column loop, batched over groups, with the columns taken in order of decreasing H diagonal. Returns
    the weights as each column was when it was rounded (the earlier columns' errors compensated): their nearest
    rounding is GPTQ's, and block reconstruction can start its learned rounding from them."""
    w = weight.clone()
    h = hessian.clone()
    groups, _, d = w.shape
    dead = torch.diagonal(h, dim1=1, dim2=2) == 0
    h[dead.unsqueeze(2).expand_as(h) & torch.eye(d, dtype=torch.bool)] = 1.0
    w[dead.unsqueeze(1).expand_as(w)] = 0.0
    order = torch.argsort(torch.diagonal(h, dim1=1, dim2=2), dim=1, descending=True)
    w = torch.gather(w, 2, order.unsqueeze(1).expand_as(w))
    h = torch.gather(torch.gather(h, 1, order.unsqueeze(2).expand_as(h)), 2, order.unsqueeze(1).expand_as(h))
    mean_diag = torch.diagonal(h, dim1=1, dim2=2).mean(1)
    h = h + DAMPING * mean_diag.reshape(-1, 1, 1) * torch.eye(d, dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    upper = torch.linalg.cholesky(inverse, upper=True)  # [groups, d, d]
    step = _group_scales(layer)[:, :, 0]
    for i in range(d):
        column = w[:, :, i]
        error = (column - (column / step).round().clamp(-layer.qmax, layer.qmax) * step) / upper[:, i, i].unsqueeze(1)
        w[:, :, i + 1:] -= error.unsqueeze(2) * upper[:, i, i + 1:].unsqueeze(1)
    restore = torch.argsort(order, dim=1)
    return torch.gather(w, 2, restore.unsqueeze(1).expand_as(w))
