"""Post-training calibration of a QuantSim on (distilled) images: activation ranges, weight scales, int32 biases."""

from __future__ import annotations

import torch

from zeroquant.errors import UsageError
from zeroquant.quant.quantizers import symmetric_scales
from zeroquant.quant.ranges import RANGE_METHODS, HistogramObserver, choose_range
from zeroquant.quant.sim import QuantSim


def _forward_all(sim: QuantSim, images: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            sim(images[start : start + batch_size])


def calibrate(sim: QuantSim, images: torch.Tensor, method: str = "mse", batch_size: int = 32,
              input_range: tuple[float, float] | None = None) -> dict[str, str]:
    """Observe float activations (two passes: range, then histogram), set every quantizer, then enable them all.

    input_range: the range of the model's input where it is known (the preprocessing of the images the model was
    trained on): distilled images spread far wider than real ones (EfficientNet-Lite0: +-5.5 against [-1, 1]), so
    a grid fitted to them gives real images a few dozen of the 256 levels.

    Returns the range method each activation quantizer ended up with (see ranges.choose_range)."""
    if method not in RANGE_METHODS:
        raise UsageError(f"unknown range method '{method}'", f"choose one of {', '.join(RANGE_METHODS)}")
    sim.set_enabled(weights=False, activations=False)
    observers = {name: HistogramObserver() for name in sim.activations}
    for name, quantizer in sim.activations.items():
        quantizer.observer = observers[name]
    try:
        _forward_all(sim, images, batch_size)
        for obs in observers.values():
            obs.start_histogram()
        _forward_all(sim, images, batch_size)
    finally:
        for quantizer in sim.activations.values():
            quantizer.observer = None
    chosen = {}
    for name, quantizer in sim.activations.items():
        bounds, chosen[name] = choose_range(method, observers[name], quantizer.prior, quantizer.bits)
        if name == sim.input_quantizer and input_range is not None:
            bounds, chosen[name] = input_range, "input range"
        quantizer.set_range(*bounds)
    for name, layer in sim.layers.items():
        feeding = sim.layer_inputs.get(name)
        layer.input_scale = sim.activations[feeding].grid()[0] if feeding else None
        layer.set_weight_scale(symmetric_scales(layer.channel_absmax(), layer.qmax))
    sim.set_enabled(weights=True, activations=True)
    return chosen
