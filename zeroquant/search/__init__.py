"""Mixed-precision weight bits: per-layer sensitivity on the distilled images, the exact cost/sensitivity frontier, and
a check of the additive estimate against end-to-end measurement on held-out distilled images."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from zeroquant.calib import CalibSet
from zeroquant.graph.batchnorm import fold_batchnorm
from zeroquant.graph.capture import capture
from zeroquant.pipeline import QuantizeOptions, distill, keep_first_last, layer_macs
from zeroquant.quant.calibrate import calibrate
from zeroquant.quant.sim import QuantSim, build_quantsim
from zeroquant.search.pareto import DEFAULT_CHOICES, Budget, Frontier, Problem, choose, describe, frontier, note
from zeroquant.search.sensitivity import cached_sensitivity, output_divergence
from zeroquant.zoo.loading import LoadedModel


@dataclass
class Search:
    front: Frontier
    sim: QuantSim  # 8-bit weights, every quantizer disabled
    calib: CalibSet
    graph_module: torch.fx.GraphModule  # the captured float graph, to distil held-out images from
    measured_bits: list[int]  # columns of `kl`: the choices and the bits of pinned layers
    kl: np.ndarray  # [layer, measured bits] sensitivity
    timings: dict

    @property
    def problem(self) -> Problem:
        return self.front.problem


def search(loaded: LoadedModel, shape, options: QuantizeOptions, choices, objective: str = "size",
           progress=None) -> Search:
    """Distil (or reuse) the calibration set, measure every layer's sensitivity (cached) and solve the frontier.

    The layers that quantize() pins (options.keep_first_last) get no fewer bits here either, so the frontier holds
    the configurations quantize() exports."""
    clock = time.perf_counter()
    captured = capture(loaded.module, shape)
    calib, _ = distill(loaded, captured.graph_module, shape, options, progress)
    sim = build_quantsim(fold_batchnorm(captured.graph_module)[0], 8, options.activation_bits, options.reduce_range)
    names = list(sim.layers)
    floor = np.array([options.keep_first_last if name in (names[0], names[-1]) else 0 for name in names])
    measured = sorted(set(choices) | set(floor[floor > 0].tolist()))
    prepared = time.perf_counter()
    kl, cached = cached_sensitivity(sim, calib.images, measured, loaded.digest, options.reduce_range,
                                    options.use_cache, progress)
    sensitivity_s = time.perf_counter() - prepared
    macs = layer_macs(sim, shape)
    sensitivity = kl[np.arange(len(names))[:, None], np.searchsorted(measured, Problem.candidate_bits(choices, floor))]
    problem = Problem(names, np.array([layer.weight.numel() for layer in sim.layers.values()]),
                      np.array([macs[name] for name in names]), tuple(choices), sensitivity, options.activation_bits,
                      objective, floor)
    front = frontier(problem)
    timings = {"capture_and_distill_s": round(prepared - clock, 3), "sensitivity_s": round(sensitivity_s, 3),
               "sensitivity_from_cache": cached, "dp_s": round(front.seconds, 4)}
    return Search(front, sim, calib, captured.graph_module, measured, kl, timings)


def measure(found: Search, loaded: LoadedModel, shape, options: QuantizeOptions, configs: list[dict],
            progress=None) -> tuple[list[dict], int]:
    """End-to-end KL and top-1 agreement with FP32 of each configuration ({layer: bits}), weights only (what the
    additive estimate predicts) and with activations at --abits as exported, and on how many images: held-out ones,
    half as many as the calibration set (distillation is the slow step), distilled with the next seed."""
    held_out, _ = distill(loaded, found.graph_module, shape,
                          replace(options, seed=options.seed + 1, num_images=max(1, options.num_images // 2)), progress)
    sim = found.sim
    sim.set_enabled(weights=False, activations=False)
    with torch.no_grad():
        reference = sim(held_out.images)
    keep_first_last(sim, options.keep_first_last)  # the activation bits of the pinned layers' inputs, as exported
    calibrate(sim, found.calib.images, options.range_method)
    results = []
    for config in configs:
        for name, bits in config.items():
            sim.layers[name].set_bits(bits)
        row = {}
        for label, activations in (("weights_only", False), ("with_activations", True)):
            sim.set_enabled(weights=True, activations=activations)
            kl, agreement = output_divergence(sim, held_out.images, reference)
            row[label] = {"kl": kl, "top1_agreement": agreement}
        results.append(row)
    sim.set_enabled(weights=False, activations=False)
    return results, len(held_out.images)


@dataclass
class BudgetChoice:
    """What `quantize --budget` exports: the chosen point's bits per layer, why (for the report) and its size."""

    layer_bits: dict[str, int]
    note: str
    chosen: str
    calib: CalibSet  # the distilled images the sensitivity was measured on (quantize calibrates on the same ones)


def bits_for_budget(loaded: LoadedModel, shape, options: QuantizeOptions, budget: Budget,
                    progress=None) -> BudgetChoice:
    """The best point of the size frontier within the budget."""
    found = search(loaded, shape, options, DEFAULT_CHOICES, "size", progress)
    front = found.front
    cost = budget.cost(front.problem)
    index = choose(front, cost)
    timing = ", ".join(f"{k} {v}" for k, v in found.timings.items())
    return BudgetChoice(front.points[index]["bits"], f"{note(front, index, budget.text, cost)} (search: {timing})",
                        describe(front.cost[index], front.problem), found.calib)
