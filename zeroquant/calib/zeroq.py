"""ZeroQ distillation (Cai et al. 2020): optimise input pixels so every BN layer sees its running statistics."""

from __future__ import annotations

import torch

from zeroquant.calib.calibset import Batch, DistillSettings
from zeroquant.calib.matching import BatchNormMatcher, distill_batches


class ZeroQDistiller:
    name = "zeroq"

    def key(self) -> dict:
        return {}

    def distill(self, graph_module, input_shape, settings: DistillSettings, device, progress,
                indices: list[int]) -> dict[int, Batch]:
        matcher = BatchNormMatcher(graph_module, input_shape, device, precision=settings.precision)

        def distill_batch(size: int, generator: torch.Generator, advance) -> torch.Tensor:
            images = torch.randn(size, *input_shape, generator=generator).to(device).requires_grad_(True)
            optimizer = torch.optim.Adam([images], lr=settings.lr)
            schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=20, min_lr=1e-4)
            for _ in range(settings.iterations):
                optimizer.zero_grad(set_to_none=True)
                step = matcher.step(images)
                prior = matcher.prior_loss(images)
                prior.backward()
                images.grad += step.grad
                optimizer.step()
                schedule.step(step.loss + prior.item())
                advance()
            return images

        return distill_batches("ZeroQ", matcher, settings, distill_batch, progress, indices)
