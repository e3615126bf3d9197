"""Bias correction: quantizing weights shifts each output channel's mean by (W - Q(W)) applied to the layer's input.
Measure that shift on the distilled images (float activations) and fold it back into the bias (Nagel et al. 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeroquant.quant.sim import QuantSim


def weight_error_shift(layer, x: torch.Tensor) -> torch.Tensor:
    """Per-output-channel mean of (W - Q(W)) * x over batch and spatial positions."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    error = layer.weight.detach() - layer.integer_weight() * layer.weight_scale.reshape(shape)
    if layer.kind == "conv":
        return F.conv2d(x, error, None, *layer.conv_args).mean((0, 2, 3))
    return F.linear(x, error).mean(0)


def correct_biases(sim: QuantSim, images: torch.Tensor, batch_size: int = 32) -> None:
    """Add the measured output shift of every layer to its bias (float pass: activations unquantized)."""
    sums = {name: 0.0 for name in sim.layers}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, name=name: sums.__setitem__(name, sums[name] + weight_error_shift(module, args[0])
                                                         * len(args[0])))
        for name, layer in sim.layers.items()]
    sim.set_enabled(weights=False, activations=False)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                sim(images[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    for name, layer in sim.layers.items():
        layer.bias.data += sums[name] / len(images)
        layer.refresh_bias()
    sim.set_enabled(weights=True, activations=True)
