"""How activation ranges are found (the encoding analyzers), separate from the quantizers that apply them.

Every method sees the same histogram of a tensor's values over the calibration images; they differ only in which
[low, high] they pick from it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from zeroquant.quant.quantizers import activation_qparams

BINS = 2048


class HistogramObserver:
    """Min/max on the first pass, then a fixed-range histogram on the second (ranges may not move between passes)."""

    def __init__(self):
        self.low = float("inf")
        self.high = float("-inf")
        self.hist: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.hist is None:
            self.low = min(self.low, float(x.min()))
            self.high = max(self.high, float(x.max()))
        else:
            self.hist += torch.histc(x.cpu(), BINS, self.low, self.high)

    def start_histogram(self) -> None:
        if self.high <= self.low:
            self.high = self.low + 1e-6
        self.hist = torch.zeros(BINS, dtype=torch.float64)

    def centers(self) -> torch.Tensor:
        edges = torch.linspace(self.low, self.high, BINS + 1, dtype=torch.float64)
        return (edges[1:] + edges[:-1]) / 2


def minmax_range(obs: HistogramObserver, bits: int) -> tuple[float, float]:
    return obs.low, obs.high


def percentile_range(obs: HistogramObserver, bits: int, percentile: float = 99.99) -> tuple[float, float]:
    cdf = obs.hist.cumsum(0) / obs.hist.sum()
    centers = obs.centers()
    tail = 1 - percentile / 100
    low = float(centers[int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))])
    high = float(centers[min(int(torch.searchsorted(cdf, torch.tensor(1 - tail, dtype=torch.float64))), BINS - 1)])
    return (low if obs.low < 0 else obs.low), high


def quantization_mse(obs: HistogramObserver, low: float, high: float, bits: int) -> float:
    """Mean squared error of quantizing the histogram's values on the grid that covers [low, high]."""
    scale, zero_point = activation_qparams(low, high, bits)
    centers = obs.centers()
    q = torch.clamp(torch.round(centers / scale) + zero_point, 0, 2**bits - 1)
    err = ((q - zero_point) * scale - centers) ** 2
    return float((err * obs.hist).sum() / obs.hist.sum().clamp_min(1))


def mse_range(obs: HistogramObserver, bits: int, steps: int = 100) -> tuple[float, float]:
    """Shrink [min, max] towards zero and keep the clipping with the least quantization MSE."""
    best, best_err = (obs.low, obs.high), float("inf")
    for i in range(steps):
        ratio = 1.0 - i / steps * 0.8
        low, high = obs.low * ratio if obs.low < 0 else obs.low, obs.high * ratio
        err = quantization_mse(obs, low, high, bits)
        if err < best_err:
            best, best_err = (low, high), err
    return best


RANGE_METHODS: dict[str, Callable[[HistogramObserver, int], tuple[float, float]]] = {
    "minmax": minmax_range,
    "percentile": percentile_range,
    "mse": mse_range,
}
