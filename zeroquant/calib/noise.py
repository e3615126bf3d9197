"""Gaussian-noise calibration: the baseline, and the only choice for a network without BatchNorm layers."""

from __future__ import annotations

import torch

from zeroquant.calib.base import CalibSet, DistillSettings, batch_generator


class NoiseDistiller:
    name = "noise"

    def distill(self, graph_module, input_shape, settings: DistillSettings, device, progress) -> CalibSet:
        images = [torch.randn(size, *input_shape, generator=batch_generator(settings.seed, index))
                  for index, size in enumerate(settings.batch_sizes())]
        return CalibSet(torch.cat(images), self.name, settings.key())
