"""Bias correction: quantizing weights shifts each output channel's mean by (W - Q(W)) applied to the layer's input.
Fold that shift back into the bias (Nagel et al. 2019), with the input's mean either measured on the distilled images
(float activations) or, `analytic`, computed from the BN statistics behind the input (the mean of a clamped normal
per channel, ranges.ChannelGaussians), which is the training data's mean; layers whose input no BN describes (after a
residual add or a pool) are measured. Layers whose bias GPTQ fitted to the float model's output (quant/gptq.py) are
left as they are: that fit already saw the quantized inputs this correction would assume float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeroquant.quant.sim import QuantSim


def weight_error_shift(layer, x: torch.Tensor) -> torch.Tensor:
    """Per-output-channel mean of (W - Q(W)) * x over batch and spatial positions, or over every leading dimension
    of a linear layer's input (tokens as well as images: [batch, tokens, features] in a ViT block)."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    error = layer.weight.detach() - layer.integer_weight() * layer.weight_scale.reshape(shape)
    if layer.kind == "conv":
        return F.conv2d(x, error, None, *layer.conv_args).mean((0, 2, 3))
    return F.linear(x, error).reshape(-1, len(error)).mean(0)


def analytic_shift(layer, input_mean: torch.Tensor) -> torch.Tensor:
    """(W - Q(W)) applied to a constant input of the given per-channel mean (zero-padding borders ignored)."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    error = layer.weight.detach() - layer.integer_weight() * layer.weight_scale.reshape(shape)
    if layer.kind == "conv":
        summed = error.sum((2, 3), keepdim=True)
        return F.conv2d(input_mean.reshape(1, -1, 1, 1), summed, groups=layer.conv_args[3]).flatten()
    return error @ input_mean


def _describes_input(prior, layer) -> bool:
    """Whether the BN-derived prior is of the tensor the layer reads: a layer behind a split or slice of it (MixNet's
    mixed convs read channel groups of one BN output) reads fewer channels than the prior has, and is measured."""
    if prior is None:
        return False
    groups = layer.conv_args[3] if layer.kind == "conv" else 1
    return len(prior.mean) == layer.weight.shape[1] * groups


def correct_biases(sim: QuantSim, images: torch.Tensor, batch_size: int = 32, analytic: bool = False) -> None:
    """Add every layer's output shift to the bias it has when quantized (layer.bias_shift): from the BN statistics of
    its input where known and `analytic`, otherwise measured in a float pass (activations unquantized)."""
    open_layers = {name for name, layer in sim.layers.items() if not layer.bias_fitted}
    priors = {name: sim.activations[feeding].prior for name, feeding in sim.layer_inputs.items()
              if analytic and name in open_layers and feeding
              and _describes_input(sim.activations[feeding].prior, sim.layers[name])}
    for name, prior in priors.items():
        layer = sim.layers[name]
        layer.bias_shift += analytic_shift(layer, prior.expected_mean())
        layer.refresh_bias()
    measured = [name for name in open_layers if name not in priors]
    sums = {name: 0.0 for name in measured}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, name=name: sums.__setitem__(name, sums[name] + weight_error_shift(module, args[0])
                                                         * len(args[0])))
        for name, layer in sim.layers.items() if name in sums]
    try:
        with torch.no_grad(), sim.float_pass():
            for start in range(0, len(images), batch_size):
                sim(images[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    for name in measured:
        layer = sim.layers[name]
        layer.bias_shift += sums[name] / len(images)
        layer.refresh_bias()
