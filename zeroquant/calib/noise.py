"""Gaussian-noise calibration: the baseline, and the only choice for a network without BatchNorm layers."""

from __future__ import annotations

import torch

from zeroquant.calib.calibset import Batch, DistillSettings, batch_generator


class NoiseDistiller:
    name = "noise"

    def key(self) -> dict:
        return {}

    def distill(self, graph_module, input_shape, settings: DistillSettings, device, progress,
                indices: list[int]) -> dict[int, Batch]:
        sizes = settings.batch_sizes()
        return {i: Batch(torch.randn(sizes[i], *input_shape, generator=batch_generator(settings.seed, i)))
                for i in indices}
