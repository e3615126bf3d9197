"""Where quantization loses accuracy: per-layer SQNR of the simulation quantize() would export against the float
model, on the distilled images, and the BatchNorm statistics the distilled images still miss."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from zeroquant.graph.decompose import for_quantization
from zeroquant.calib import CalibSet
from zeroquant.quant.sim import QuantSim, build_quantsim

BATCH = 8  # images per pass: every layer's output of a batch is held twice (float and quantized)


@dataclass
class LayerSQNR:
    name: str  # the model's module path, as in quantize's report
    kind: str
    weight_bits: int
    input_bits: int | None
    sqnr_db: float  # the layer's output, everything quantized
    weights_only_sqnr_db: float  # the layer's output, activations float: the weights' share of the error
    weight_sqnr_db: float  # the layer's own weight tensor


def sqnr_db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _outputs(sim: QuantSim, images: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = {}
    hooks = [layer.register_forward_hook(lambda _, __, out, name=name: outputs.__setitem__(name, out.double()))
             for name, layer in sim.layers.items()]
    try:
        with torch.no_grad():
            sim(images)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def _quantized_weight(layer) -> torch.Tensor:
    return layer.integer_weight() * layer.weight_scale.reshape(-1, *[1] * (layer.weight.dim() - 1))


def layer_sqnr(graph_module: torch.fx.GraphModule, sim: QuantSim, images: torch.Tensor) -> list[LayerSQNR]:
    """SQNR of every conv/linear output, worst first. The reference is a fresh float simulation of the captured
    graph, since reconstruction leaves the simulation's weights on their learned grid."""
    reference = build_quantsim(for_quantization(graph_module)[0])  # every quantizer disabled
    signal = dict.fromkeys(sim.layers, 0.0)
    noise = {mode: dict.fromkeys(sim.layers, 0.0) for mode in (True, False)}  # activations quantized or not
    try:
        for batch in images.split(BATCH):
            expected = _outputs(reference, batch)
            for activations, errors in noise.items():
                sim.set_enabled(weights=True, activations=activations)
                for name, out in _outputs(sim, batch).items():
                    errors[name] += (out - expected[name]).square().sum().item()
            for name, out in expected.items():
                signal[name] += out.square().sum().item()
    finally:
        sim.set_enabled(weights=True, activations=True)
    rows = []
    for name, layer in sim.layers.items():
        float_weight = reference.layers[name].weight.double()
        weight_noise = (_quantized_weight(layer).double() - float_weight).square().sum().item()
        feeding = sim.layer_inputs.get(name)
        rows.append(LayerSQNR(layer.name, layer.kind, layer.bits, sim.activations[feeding].bits if feeding else None,
                              sqnr_db(signal[name], noise[True][name]), sqnr_db(signal[name], noise[False][name]),
                              sqnr_db(float_weight.square().sum().item(), weight_noise)))
    return sorted(rows, key=lambda row: row.sqnr_db)


def bn_mismatch(calib: CalibSet) -> list[tuple[str, float]]:
    """ZeroQ's loss per BatchNorm layer left after distillation, worst first (empty for noise calibration)."""
    return sorted(calib.layer_mismatch.items(), key=lambda item: -item[1])


def quant_report(graph_module: torch.fx.GraphModule, sim: QuantSim, calib: CalibSet, top: int | None = None) -> dict:
    """Both measurements as plain data, the `top` worst rows of each (all when None)."""
    return {"layers": [asdict(row) for row in layer_sqnr(graph_module, sim, calib.images)[:top]],
            "bn_mismatch": [{"layer": name, "mismatch": value} for name, value in bn_mismatch(calib)[:top]],
            "distillation": {"method": calib.method, "images": len(calib.images), "final_bn_loss": calib.final_loss,
                             "settings": calib.settings}}
