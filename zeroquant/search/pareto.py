"""Mixed-precision search: the exact frontier of weight cost (packed size or BOPs) against summed layer sensitivity.

Choosing one bit-width per layer to minimise summed sensitivity under a cost budget is a multiple-choice knapsack.
`frontier` solves it for every budget at once by dynamic programming over layers on the integer cost axis (size in
bits = params * bits, BOPs = MACs * wbits * abits), where each state is a reachable total cost and states that a
cheaper one beats are pruned: exact, and far smaller than the full axis because only non-dominated costs survive.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np

from zeroquant.errors import UsageError

DEFAULT_CHOICES = (2, 3, 4, 5, 6, 8)
SAFE_BITS = 4  # layers below this are where data-free mixed precision collapses (Lite0 at 3.67 bits: 0.2 % top-1)
OBJECTIVES = ("size", "bops")
_NUMBER = r"\s*(?P<n>\d+(?:\.\d*)?|\.\d+)\s*"
_FORMS = {"bits": re.compile(_NUMBER), "size": re.compile(_NUMBER + r"(?P<prefix>[kmg]i?)?b\s*", re.IGNORECASE),
          "bops": re.compile(_NUMBER + r"(?P<prefix>[kmgt])?bops\s*", re.IGNORECASE)}
_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30}


@dataclass
class Problem:
    """Layers, their candidate bit-widths and per-layer sensitivity (KL, one row per layer, one column per choice)."""

    layers: list[str]
    params: np.ndarray  # weights per layer
    macs: np.ndarray  # multiply-accumulates per layer for one image
    choices: tuple[int, ...]
    sensitivity: np.ndarray  # at bits[layer, choice]
    abits: int = 8
    objective: str = "size"

    def per_bit(self, objective: str | None = None) -> np.ndarray:
        """Cost of one weight bit in each layer: its weights (size), or its MACs times the activation bits (BOPs)."""
        return self.params if (objective or self.objective) == "size" else self.macs * self.abits

    def costs(self, objective: str | None = None) -> np.ndarray:
        """Cost of every (layer, choice): size in bits, or bit operations for one image."""
        return (self.per_bit(objective)[:, None] * np.array(self.choices)[None, :]).astype(np.int64)

    @property
    def unit(self) -> int:
        """Cost of one average weight bit (average bits = cost / unit)."""
        return int(self.per_bit().sum())

    def point(self, index: np.ndarray) -> dict:
        """A configuration (one choice index per layer) with everything pareto.json says about it."""
        rows = np.arange(len(self.layers))
        size, bops = self.costs("size")[rows, index].sum(), self.costs("bops")[rows, index].sum()
        return {"bits": dict(zip(self.layers, np.array(self.choices)[index].tolist())),
                "average_bits": round(float(size / self.params.sum()), 4), "size_bytes": int(size) / 8,
                "bops": int(bops), "sensitivity": float(self.sensitivity[rows, index].sum())}


@dataclass
class Frontier:
    problem: Problem
    cost: np.ndarray  # increasing
    sensitivity: np.ndarray  # strictly decreasing
    index: np.ndarray  # [point, layer] -> choice index
    seconds: float = 0.0
    points: list[dict] = field(init=False)

    def __post_init__(self):
        self.points = [self.problem.point(row) for row in self.index]


def frontier(problem: Problem) -> Frontier:
    start = time.perf_counter()
    cost, value, index = pareto_dp(problem.costs(), problem.sensitivity)
    return Frontier(problem, cost, value, index, time.perf_counter() - start)


def pareto_dp(costs: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All non-dominated (total cost, total value) of picking one column per row, with the picks ([point, row])."""
    k = costs.shape[1]
    cost, value, parents = np.zeros(1, np.int64), np.zeros(1), []
    for row_cost, row_value in zip(costs, values):
        cand_cost = (cost[:, None] + row_cost).ravel()
        cand_value = (value[:, None] + row_value).ravel()
        order = np.lexsort((cand_value, cand_cost))
        best_before = np.minimum.accumulate(np.concatenate(([np.inf], cand_value[order][:-1])))
        order = order[cand_value[order] < best_before]
        parents.append(order)
        cost, value = cand_cost[order], cand_value[order]
    picks, at = np.empty((len(cost), len(parents)), np.int64), np.arange(len(cost))
    for row in reversed(range(len(parents))):
        at, picks[:, row] = np.divmod(parents[row][at], k)
    return cost, value, picks


@dataclass
class Budget:
    """A --budget as written: average weight bits (`4.5`), a packed weight size (`0.2MB`, `200KB`, `1MiB`) or bit
    operations per image (`3.5GBOPs`); read before any work, so a typo fails at once."""

    text: str
    kind: str  # "bits", "size" (bytes) or "bops"
    value: float

    def cost(self, problem: Problem) -> float:
        """The budget in the problem's cost units; a budget below every configuration is a UsageError."""
        budget = {"bits": self.value * problem.unit, "size": self.value * 8, "bops": self.value}[self.kind]
        costs = problem.costs()
        low, high = costs[:, 0].sum(), costs[:, -1].sum()
        if budget < low:
            raise UsageError(f"--budget {self.text} is below the smallest configuration (every layer at its fewest "
                             "bits)",
                             f"feasible budgets: {describe(low, problem)} to {describe(high, problem)}")
        return budget


def parse_budget(text: str, choices=DEFAULT_CHOICES, objective: str = "size") -> Budget:
    """Read --budget; a wrong unit, or average bits below the smallest choice, fail here, before any distillation."""
    for kind, pattern in _FORMS.items():
        match = pattern.fullmatch(text)
        if match:
            budget = Budget(text, kind, float(match["n"]) * _PREFIX[(match.groupdict().get("prefix") or "").lower()])
            if kind not in ("bits", objective):
                raise UsageError(f"--budget {text} is a {kind} budget but the objective is {objective}",
                                 "give average weight bits (e.g. 4.5) or use the matching --objective")
            if kind == "bits" and budget.value < min(choices):
                raise UsageError(f"--budget {text} is below the smallest configuration (every layer at "
                                 f"{min(choices)} bits)", f"feasible budgets: {min(choices)} to {max(choices)} "
                                                          "average bits")
            return budget
    raise UsageError(f"cannot read --budget '{text}'",
                     "give average weight bits (4.5), a weight size (0.2MB, 200KB) or BOPs per image (3.5GBOPs)")


def describe(cost: float, problem: Problem) -> str:
    """A cost in average weight bits (weighted by MACs for BOPs) and in the objective's unit."""
    if problem.objective == "size":
        return f"{cost / problem.unit:.3g} average bits ({cost / 8e6:.3g} MB)"
    return f"{cost / problem.unit:.3g} MAC-weighted average bits ({cost / 1e9:.3g} GBOPs)"


def least_safe_cost(problem: Problem) -> int:
    """The cost of every layer at SAFE_BITS or more (the smallest choice at or above it): a budget below it must put
    layers under SAFE_BITS."""
    column = next((i for i, bits in enumerate(problem.choices) if bits >= SAFE_BITS), len(problem.choices) - 1)
    return int(problem.costs()[:, column].sum())


def below_safe_bits(problem: Problem, point: dict, budget_text: str, budget: float) -> str | None:
    """A warning when the budget forces layers under SAFE_BITS, naming the smallest budget that does not."""
    safe = least_safe_cost(problem)
    low = [name for name, bits in point["bits"].items() if bits < SAFE_BITS]
    if budget >= safe or not low:
        return None
    params = dict(zip(problem.layers, problem.params))
    share = 100 * sum(params[name] for name in low) / problem.params.sum()
    return (f"--budget {budget_text} forces {len(low)} of {len(problem.layers)} layers ({share:.0f} % of the weights) "
            f"below {SAFE_BITS} bits, where data-free quantization can collapse; the smallest budget with every layer "
            f"at {SAFE_BITS}+ bits is {describe(safe, problem)}")


def choose(front: Frontier, budget: float) -> int:
    """The frontier point with the lowest estimated sensitivity whose cost fits the budget."""
    return int(np.searchsorted(front.cost, budget, side="right")) - 1


def spread(front: Frontier, n: int, also: int | None = None) -> list[int]:
    """About n frontier indices evenly spaced in cost, plus `also` (the chosen point)."""
    targets = np.linspace(front.cost[0], front.cost[-1], n)
    picked = set(np.minimum(np.searchsorted(front.cost, targets), len(front.cost) - 1).tolist())
    return sorted(picked | ({also} if also is not None else set()))


def note(front: Frontier, index: int, budget_text: str, budget: float) -> str:
    """Why this configuration: the report's mixed_precision note."""
    point, problem = front.points[index], front.problem
    return (f"mixed_precision: --budget {budget_text} = {describe(budget, problem)}; chose point {index + 1} of the "
            f"{len(front.points)}-point {problem.objective} frontier (bits {','.join(map(str, problem.choices))}), the "
            f"lowest estimated sensitivity (summed per-layer KL {point['sensitivity']:.4g}) within the budget, at "
            f"{describe(front.cost[index], problem)}; the ONNX file stores these weights as int8 on each layer's "
            f"b-bit grid (bits per layer: layers[].weight_bits)")


def uniform_points(problem: Problem) -> list[dict]:
    """Every layer at the same bit-width, one configuration per choice: the baselines the frontier must beat."""
    return [problem.point(np.full(len(problem.layers), i)) for i in range(len(problem.choices))]
