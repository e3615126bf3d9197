"""Second-order weight rounding (GPTQ, Frantar et al. 2023; OBQ before it): per layer, the Hessian H = X X^T of the
layer's inputs on the calibration images decides how each weight's rounding error is compensated by the weights not
yet rounded, column by column, so that the layer's output (not its weights) stays close to the float one. It costs a
forward pass and a Cholesky factorisation per layer: seconds, where block reconstruction costs minutes per block on a
CPU, and it can be reconstruction's starting point.

Layers go in graph order and each sees the inputs the model so far produces with everything before it quantized
(weights and activations), as it will at run time. Grouped and depthwise convs solve one small problem per group,
batched. The per-channel step sizes are chosen first (a search over clipping ratios of each channel's range that
minimises the H-weighted error, i.e. the output error, of plain rounding), then kept fixed while GPTQ rounds.
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


@dataclass
class InputHessian:
    matrix: torch.Tensor  # [groups, d, d]: mean over images of the sum over positions of x x^T
    samples: int  # input vectors (images x output positions) it was summed over

    @property
    def well_sampled(self) -> bool:
        return self.samples >= MIN_SAMPLES_PER_COLUMN * self.matrix.shape[-1]


ROUNDINGS = ("auto", "nearest", "gptq")


def uses_gptq(rounding: str, bits: int) -> bool:
    """Whether the `rounding` option rounds weights of `bits` bits by GPTQ; auto does below 8 bits. At 8 bits nearest
    rounding's error is already smaller than the gap between distilled and real inputs that GPTQ ends up fitting:
    on EfficientNet-Lite0 W8A8 GPTQ raised the KL to FP32 on real photos from 0.004 to 0.02-0.035 (agreement 98.8 ->
    96 %) whatever its damping or sampling guard; on ResNet-20/32 it gained 0.1-0.25 points (benchmarks/RESULTS.md)."""
    return rounding == "gptq" or (rounding == "auto" and bits < 8)


def gptq_layers(sim: QuantSim, rounding: str) -> list[str]:
    """The layers of `sim` that the `rounding` option rounds by GPTQ at their current bits."""
    return [name for name, layer in sim.layers.items() if uses_gptq(rounding, layer.bits)]


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
            summary.append(round_layer(layer, hessian(sim, layer, images), search_scales))
            advance()
    return summary


def round_layer(layer: QuantizedLayer, inputs: InputHessian, search_scales: bool = True) -> dict:
    """GPTQ for one layer at its current bits, given the Hessian of its inputs: sets its step sizes and, where it
    lowers the output error, its rounding (round_from); returns both errors. A poorly sampled Hessian leaves the layer
    to nearest rounding."""
    weight, h = _grouped(layer), inputs.matrix
    if not inputs.well_sampled:
        error = _output_error(weight, _rounded(weight, layer), h)
        return {"layer": layer.name, "error_nearest": error, "error_gptq": error, "skipped": "too few samples"}
    if search_scales:
        layer.set_weight_scale(_best_scales(weight, h, layer))
    before = _output_error(weight, _rounded(weight, layer), h)
    compensated = _gptq_groups(weight, h, layer)
    after = _output_error(weight, _rounded(compensated, layer), h)
    if after < before:  # never worse than nearest rounding on the calibration images
        layer.round_from = _ungrouped(compensated, layer)
    return {"layer": layer.name, "error_nearest": before, "error_gptq": min(before, after)}


def hessian(sim: QuantSim, layer: QuantizedLayer, images: torch.Tensor) -> InputHessian:
    """H of the layer's (unfolded, per group) inputs x as the simulation is configured (quantized before the layer,
    or float for sensitivity)."""
    total, samples = None, 0

    def collect(module, args):
        nonlocal total, samples
        columns = _columns(module, args[0].detach().double())
        product = columns @ columns.transpose(1, 2)
        total = product if total is None else total + product
        samples += columns.shape[2]
        raise _Stop

    hook = layer.register_forward_pre_hook(collect)
    try:
        with torch.no_grad():
            for chunk in images.split(CHUNK):
                try:
                    sim(chunk)
                except _Stop:
                    pass
    finally:
        hook.remove()
    return InputHessian(total / len(images), samples)


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


def _grouped(layer: QuantizedLayer) -> torch.Tensor:
    """The float weights as [groups, rows per group, d]."""
    groups = layer.conv_args[3] if layer.kind == "conv" else 1
    return layer.weight.detach().double().reshape(groups, layer.weight.shape[0] // groups, -1)


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
    absmax = layer.channel_absmax().double()
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
