"""Gaussian-noise calibration: the baseline, and the only choice for a network without BatchNorm layers."""

from __future__ import annotations

import torch

from zeroquant.calib.base import CalibSet, DistillSettings


class NoiseDistiller:
    name = "noise"

    def distill(self, graph_module, input_shape, settings: DistillSettings, device, progress=None) -> CalibSet:
        generator = torch.Generator().manual_seed(settings.seed)
        return CalibSet(torch.randn(settings.num_images, *input_shape, generator=generator), self.name,
                        settings.key())
