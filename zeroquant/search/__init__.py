"""Mixed-precision weight bits: per-layer sensitivity on the distilled images, the exact cost/sensitivity frontier,
and a check of the additive estimate against end-to-end measurement on held-out distilled images.

The pipeline hands in the captured graph and the images; nothing here captures, distils or writes the model."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from zeroquant.distributed import Workers
from zeroquant.progress import SILENT, Progress
from zeroquant.quant.calibrate import calibrate
from zeroquant.quant.gptq import gptq, gptq_layers
from zeroquant.quant.plan import keep_first_last
from zeroquant.quant.sim import QuantSim, build_quantsim
from zeroquant.search.pareto import Frontier, Problem, frontier
from zeroquant.search.sensitivity import cached_sensitivity, output_divergence


@dataclass
class Search:
    front: Frontier
    sim: QuantSim  # 8-bit weights, every quantizer disabled
    measured_bits: list[int]  # columns of `kl`: the choices, in increasing order
    kl: np.ndarray  # [layer, measured bits] sensitivity
    timings: dict

    @property
    def problem(self) -> Problem:
        return self.front.problem


def search(folded: torch.fx.GraphModule, images: torch.Tensor, input_shape, choices, objective: str = "size",
           abits: int = 8, reduce_range: bool = True, model_digest: str = "",
           use_cache: bool = True, progress: Progress = SILENT, workers: Workers = Workers(),
           rounding: str = "nearest") -> Search:
    """Measure every layer's sensitivity (cached) on the BN-folded graph and solve the frontier.

    Every layer's weights are searched, the first and last layer's too: --keep-first-last pins the 8 bits of a
    uniform --wbits there, but under a budget the frontier prices them like the rest. EfficientNet-Lite0's classifier
    holds 28 % of the weights; pinned at 8 bits, --budget 5.0 forced 9 layers below 4 bits (83.8 % top-1 against
    FP32's 88.2); searched, it took 4 bits and no layer went below 4 (86.4 %), benchmarks/RESULTS.md."""
    sim = build_quantsim(folded, 8, abits, reduce_range)
    names = list(sim.layers)
    measured = sorted(set(choices))
    clock = time.perf_counter()
    kl, cached = cached_sensitivity(sim, images, measured, model_digest, reduce_range, use_cache, progress, workers,
                                    rounding)
    sensitivity_s = time.perf_counter() - clock
    macs = sim.layer_macs(input_shape)
    sensitivity = kl[:, np.searchsorted(measured, choices)]
    problem = Problem(names, np.array([layer.weight.numel() for layer in sim.layers.values()]),
                      np.array([macs[name] for name in names]), tuple(choices), sensitivity, abits, objective)
    front = frontier(problem)
    timings = {"sensitivity_s": round(sensitivity_s, 3), "sensitivity_from_cache": cached,
               "dp_s": round(front.seconds, 4)}
    return Search(front, sim, measured, kl, timings)


def measure(found: Search, calib_images: torch.Tensor, held_out: torch.Tensor, range_method: str,
            keep_first_last_bits: int, configs: list[dict], rounding: str = "nearest",
            input_range: tuple[float, float] | None = None) -> list[dict]:
    """End-to-end KL and top-1 agreement with FP32 of each configuration ({layer: bits}) on held-out images, weights
    only (what the additive estimate predicts) and with activations quantized as exported, the weights rounded as
    quantize() rounds them."""
    sim = found.sim
    sim.set_enabled(weights=False, activations=False)
    with torch.no_grad():
        reference = sim(held_out)
    keep_first_last(sim, keep_first_last_bits)  # the activation bits of the pinned layers' inputs, as exported
    calibrate(sim, calib_images, range_method, input_range=input_range)
    results = []
    for config in configs:
        for name, bits in config.items():
            sim.layers[name].set_bits(bits)
        second_order = gptq_layers(sim, rounding)
        if second_order:
            sim.set_enabled(weights=True, activations=True)
            gptq(sim, calib_images, second_order)
        row = {}
        for label, activations in (("weights_only", False), ("with_activations", True)):
            sim.set_enabled(weights=True, activations=activations)
            kl, agreement = output_divergence(sim, held_out, reference)
            row[label] = {"kl": kl, "top1_agreement": agreement}
        results.append(row)
    sim.set_enabled(weights=False, activations=False)
    return results
