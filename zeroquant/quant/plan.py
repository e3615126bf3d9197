"""Which layers keep more bits than the rest under a uniform bit-width: the policy quantize() and the
mixed-precision search share, so the frontier holds exactly the configurations that quantize() exports."""

from __future__ import annotations

from zeroquant.quant.sim import QuantSim


def first_and_last(sim: QuantSim) -> set[str]:
    names = list(sim.layers)
    return {names[0], names[-1]} if names else set()


def keep_depthwise(sim: QuantSim, bits: int) -> int:
    """Depthwise convs get at least `bits` weight bits; returns how many were raised. They hold few weights (4 % of
    EfficientNet-Lite0's) but lose the most at 4 bits: Lite0 W4A8 went from 56.6 to 72.6 % top-1 with them at 8."""
    raised = [layer for layer in sim.layers.values() if layer.is_depthwise and layer.bits < bits]
    for layer in raised:
        layer.set_bits(bits)
    return len(raised)


def keep_first_last(sim: QuantSim, bits: int, chosen: frozenset[str] = frozenset()) -> None:
    """The first and last layers (and the tensors they read) stay at `bits`: the image and the logits are where
    low-bit noise costs the most accuracy for the least size. The weights of layers in `chosen` (bits the caller
    set per layer) keep the bits they were given: an explicit choice is never changed silently."""
    if not bits:
        return
    for name in first_and_last(sim):
        if name not in chosen:
            sim.layers[name].set_bits(max(bits, sim.layers[name].bits))
        feeding = sim.layer_inputs.get(name)
        if feeding:
            sim.activations[feeding].bits = max(bits, sim.activations[feeding].bits)
