"""How activation ranges are found (the encoding analyzers), separate from the quantizers that apply them.

The data-driven methods see the same histogram of a tensor's values over the calibration images and differ only in
which [low, high] they pick from it. `analytic` needs no images: a tensor that a conv+BN (and maybe a ReLU/ReLU6)
produced is, per channel, normal with the BN's beta and |gamma| on the training data (Nagel et al. 2019), so its
histogram is known. `auto` picks, per tensor, the candidate whose quantization error is lowest on both the distilled
histogram and the BN-derived one, because distilled images match the BN statistics only approximately.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class ChannelGaussians:
    """What a tensor looks like on the training data, from the BN folded into its producer: per channel normal with
    mean beta and std |gamma|, then clamped to [low, high] by a following ReLU/ReLU6."""

    mean: torch.Tensor
    std: torch.Tensor
    low: float = -math.inf
    high: float = math.inf

    def expected_mean(self) -> torch.Tensor:
        """Per channel E[clamp(X, low, high)] for X ~ N(mean, std): what the next layer's input averages to."""
        mean, std = self.mean.double(), self.std.double().clamp_min(1e-8)
        low, high = torch.tensor(self.low, dtype=torch.float64), torch.tensor(self.high, dtype=torch.float64)
        a, b = (low - mean) / std, (high - mean) / std
        cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
        pdf = lambda z: torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731  (0 at +-inf)
        below = torch.where(cdf_a > 0, low * cdf_a, torch.zeros_like(mean))
        above = torch.where(cdf_b < 1, high * (1 - cdf_b), torch.zeros_like(mean))
        return (below + above + mean * (cdf_b - cdf_a) + std * (pdf(a) - pdf(b))).float()

    def histogram(self, width: float = 6.0) -> HistogramObserver:
        """The mixture of the channels' clamped normals (covering +-`width` std) as a histogram observer."""
        mean, std = self.mean.double(), self.std.double().clamp_min(1e-8)
        obs = HistogramObserver()
        obs.low = max(float((mean - width * std).min()), self.low)
        obs.high = min(float((mean + width * std).max()), self.high)
        obs.start_histogram()
        edges = torch.linspace(obs.low, obs.high, BINS + 1, dtype=torch.float64)
        cdf = torch.special.ndtr((edges[None, :] - mean[:, None]) / std[:, None])
        cdf[:, 0], cdf[:, -1] = 0.0, 1.0  # mass beyond the ends (clamped by the activation) lands in the end bins
        obs.hist = (cdf[:, 1:] - cdf[:, :-1]).sum(0)
        return obs


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


DATA_METHODS: dict[str, Callable[[HistogramObserver, int], tuple[float, float]]] = {
    "minmax": minmax_range,
    "percentile": percentile_range,
    "mse": mse_range,
}
RANGE_METHODS = (*DATA_METHODS, "analytic", "auto")


def relative_mse(obs: HistogramObserver, low: float, high: float, bits: int) -> float:
    """Quantization MSE over the histogram's variance: comparable across tensors and distributions."""
    centers = obs.centers()
    weights = obs.hist / obs.hist.sum().clamp_min(1e-12)
    variance = float((weights * (centers - (weights * centers).sum()) ** 2).sum())
    return quantization_mse(obs, low, high, bits) / max(variance, 1e-12)


def choose_range(method: str, observed: HistogramObserver, prior: ChannelGaussians | None,
                 bits: int) -> tuple[tuple[float, float], str]:
    """The range `method` gives a tensor, and the method that produced it (analytic falls back to mse on tensors
    no BN describes; auto names the candidate it picked)."""
    if method in DATA_METHODS:
        return DATA_METHODS[method](observed, bits), method
    expected = prior.histogram() if prior is not None else None
    if method == "analytic":
        return (mse_range(expected, bits), "analytic") if expected else (mse_range(observed, bits), "mse")
    candidates = {name: choose(observed, bits) for name, choose in DATA_METHODS.items()}
    if expected is not None:
        candidates["analytic"] = mse_range(expected, bits)

    def error(bounds) -> float:
        err = relative_mse(observed, *bounds, bits)
        return err + relative_mse(expected, *bounds, bits) if expected is not None else err

    best = min(candidates, key=lambda name: error(candidates[name]))
    return candidates[best], best
