"""ZeroQ distillation (Cai et al. 2020): optimise input pixels so every BN layer sees its running statistics."""

from __future__ import annotations

import torch

from zeroquant.calib.base import CalibSet, DistillSettings, tap_batchnorms


class ZeroQDistiller:
    name = "zeroq"

    def distill(self, graph_module, input_shape, settings: DistillSettings, device, progress=None) -> CalibSet:
        model, losses = tap_batchnorms(graph_module)
        model = model.to(device)
        generator = torch.Generator().manual_seed(settings.seed)
        batches, mismatch, final = [], {}, []
        sizes = [min(settings.batch_size, settings.num_images - s) for s in range(0, settings.num_images,
                                                                                  settings.batch_size)]
        task = progress.add_task("ZeroQ distillation", total=len(sizes) * settings.iterations) if progress else None
        for size in sizes:
            images = torch.randn(size, *input_shape, generator=generator).to(device).requires_grad_(True)
            optimizer = torch.optim.Adam([images], lr=settings.lr)
            schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=20, min_lr=1e-4)
            for _ in range(settings.iterations):
                losses.clear()
                optimizer.zero_grad(set_to_none=True)
                model(images)
                prior = input_prior_loss(images)
                loss = sum(value for _, value in losses) + prior
                loss.backward()
                optimizer.step()
                schedule.step(loss.item())
                if progress:
                    progress.advance(task)
            final.append(loss.item())
            for name, value in losses:
                mismatch[name] = mismatch.get(name, 0.0) + value.item() / len(sizes)
            batches.append(images.detach().cpu())
        return CalibSet(torch.cat(batches), self.name, settings.key(), sum(final) / len(final), mismatch)


def input_prior_loss(images: torch.Tensor) -> torch.Tensor:
    """Pull the per-channel mean and std of the images towards 0 and 1, the statistics of normalised inputs."""
    dims = [0, 2, 3]
    return torch.norm(images.mean(dims)) + torch.norm(images.std(dims) - 1)
