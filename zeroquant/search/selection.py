"""--budget: which bit allocations to build (the frontier's choice and the uniform configuration of the same cost)
and which of the built models to keep (the closest to the float model on held-out images), or none if it collapsed.

The frontier is estimated from each layer alone; GPTQ and reconstruction then recover more in some configurations
than in others, so the pipeline builds every candidate as exported and this module decides on the measurement."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeroquant.errors import UsageError
from zeroquant.quant.sim import QuantSim
from zeroquant.search import Search
from zeroquant.search.pareto import (SAFE_BITS, Budget, below_safe_bits, choose, describe, least_safe_cost, note,
                                     uniform_points)
from zeroquant.search.sensitivity import output_divergence

MIN_AGREEMENT = 25.0  # % top-1 agreement with the float model on held-out distilled images below which --budget's
# model has collapsed. Lite0 (16 held-out images): with inversion images and GPTQ --budget 4.0 agrees on 12.5 % (31 %
# top-1 on photos) and 5.0 on 68.8 % (77 %); with ZeroQ images and nearest rounding 4.0 agreed on 0 % (0.2 % top-1)
# and 5.0 on 25 % (89 % agreement on photos with GPTQ): distilled images sit near class boundaries, so a usable model
# can agree on few of them. Noisy on 16 images: the same 4.0 run with 1 thread measured 37.5 % (27 % top-1), kept;
# and not comparable across image kinds: ZeroQ images with GPTQ put 5.0 at 18.8 %, refused, though it gave 81.2 % top-1


@dataclass
class Candidate:
    """A bit allocation to try: its bits per layer, where it came from, and why (for the report)."""

    label: str  # "frontier point 7", "uniform W4"
    layer_bits: dict[str, int]
    note: str = ""
    warning: str | None = None  # a budget that forces layers below SAFE_BITS


def budget_candidates(found: Search, budget: Budget) -> list[Candidate]:
    """The frontier point with the least estimated sensitivity within the budget and, to measure it against, the
    largest uniform configuration within the budget, when they differ."""
    front, problem = found.front, found.problem
    cost = budget.cost(problem)
    index = choose(front, cost)
    timing = ", ".join(f"{k} {v}" for k, v in found.timings.items())
    candidates = [Candidate(f"frontier point {index + 1}", front.points[index]["bits"],
                            f"{note(front, index, budget.text, cost)} (search: {timing})",
                            below_safe_bits(problem, front.points[index], budget.text, cost))]
    costs = problem.costs()
    fitting = [(bits, point) for column, (bits, point) in enumerate(zip(problem.choices, uniform_points(problem)))
               if costs[:, column].sum() <= cost]
    if fitting and fitting[-1][1]["bits"] != candidates[0].layer_bits:
        bits, point = fitting[-1]
        candidates.append(Candidate(f"uniform W{bits}", point["bits"]))
    return candidates


def closest(sims: list[QuantSim], candidates: list[Candidate], held_out: torch.Tensor, reference, found: Search,
            budget_text: str) -> tuple[int, str]:
    """The index of the model closest to the float one on the held-out images (KL of the outputs) and a note of
    what was measured. A kept model that agrees with the float one on fewer than MIN_AGREEMENT % of them has
    collapsed: a UsageError naming the smallest budget that keeps every layer at SAFE_BITS or more."""
    scores = [output_divergence(sim, held_out, reference) for sim in sims]
    best = min(range(len(sims)), key=lambda i: scores[i][0])
    measured = "; ".join(f"{c.label}: KL {kl:.4g}, top-1 agreement {agree:.1f} %" for c, (kl, agree) in
                         zip(candidates, scores))
    if scores[best][1] < MIN_AGREEMENT:
        safe = least_safe_cost(found.problem)
        raise UsageError(f"--budget {budget_text} gives a model that agrees with the float one on only "
                         f"{scores[best][1]:.0f} % of {len(held_out)} held-out distilled images ({measured}): it has "
                         "collapsed, nothing was written",
                         f"give a larger --budget (every layer at {SAFE_BITS}+ bits from "
                         f"{describe(safe, found.problem)})")
    return best, (f"mixed_precision: measured as exported (rounding, bias correction and reconstruction as set) on "
                  f"{len(held_out)} held-out distilled images: {measured}; kept {candidates[best].label}")
