"""Model inversion with the levers of DeepInversion (Yin et al. 2020) and Sony MCT's data generation on ZeroQ's loss:
free pixels like ZeroQ, but every step sees the batch randomly shifted (circular roll) and flipped, so the pixels
cannot fit one sampling grid (ZeroQ's images turn into high-frequency noise that calibrates badly); a cross-entropy
term towards a random class per image, so the batch is not all one class and the logits have realistic range;
pixels clipped to the range the preprocessing can produce; and a cosine-decayed learning rate. `coarse` spends the
first part of the steps at half resolution, then upsamples and refines: cheaper steps and smoother images, but on
EfficientNet-Lite0 (W4A8, benchmarks/data_quality.py) half of 80 steps at 112 px calibrated worse than 50 or 80 steps
at 224 px, so it is off by default. The BN loss is base.py's, so final losses compare with ZeroQ's and Genie's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from zeroquant.calib.calibset import Batch, DistillSettings
from zeroquant.calib.matching import BatchNormMatcher, distill_batches


@dataclass(frozen=True)
class InversionDistiller:
    name: ClassVar[str] = "inversion"
    shift: float = 0.125  # largest random roll, as a fraction of the image side
    flip: bool = True  # random horizontal flip every step
    output_weight: float = 1.0  # weight of the cross-entropy to each image's random class (0: BN loss only)
    coarse: float = 0.0  # fraction of the steps spent at half resolution (off: it measured worse on Lite0)

    def key(self) -> dict:
        """What shapes the images besides DistillSettings (part of the cache key)."""
        return {"shift": self.shift, "flip": self.flip, "output_weight": self.output_weight, "coarse": self.coarse}

    def distill(self, graph_module, input_shape, settings: DistillSettings, device, progress,
                indices: list[int]) -> dict[int, Batch]:
        device = torch.device(device)
        matcher = BatchNormMatcher(graph_module, input_shape, device)
        low, high = _channel_bounds(settings.pixel_range, input_shape[0], device)
        output = matcher.outputs(torch.zeros(1, *input_shape, device=device))
        classes = output.shape[1] if isinstance(output, torch.Tensor) and output.dim() == 2 else 0

        def distill_batch(size: int, generator: torch.Generator, advance) -> torch.Tensor:
            channels, rows, cols = input_shape
            coarse_steps = int(round(self.coarse * settings.iterations)) if min(rows, cols) >= 64 else 0
            start = (rows // 2, cols // 2) if coarse_steps else (rows, cols)
            images = torch.randn(size, channels, *start, generator=generator).to(device)
            if low is not None:
                images = torch.maximum(torch.minimum((low + high) / 2 + images * (high - low) / 4, high), low)
            output_loss = None
            if self.output_weight > 0 and classes > 1:
                targets = torch.randint(0, classes, (size,), generator=generator).to(device)
                output_loss = _cross_entropy(targets, self.output_weight)
            for steps, shape in ((coarse_steps, start), (settings.iterations - coarse_steps, (rows, cols))):
                if steps <= 0:
                    continue
                if tuple(images.shape[-2:]) != shape:
                    images = F.interpolate(images, size=shape, mode="bilinear", align_corners=False)
                images = images.detach().requires_grad_(True)
                optimizer = torch.optim.Adam([images], lr=settings.lr)
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=settings.lr / 100)
                for _ in range(steps):
                    optimizer.zero_grad(set_to_none=True)
                    seen = self._augment(images, generator)
                    step = matcher.step(seen.detach(), output_loss)
                    seen.backward(step.grad)
                    if low is None:
                        matcher.prior_loss(images).backward()
                    optimizer.step()
                    schedule.step()
                    if low is not None:
                        with torch.no_grad():
                            images.copy_(torch.maximum(torch.minimum(images, high), low))
                    advance()
            return images.detach()

        return distill_batches("Inversion", matcher, settings, distill_batch, progress, indices)

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch as this step sees it: rolled by a random offset, flipped half of the time."""
        seen = images
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            seen = seen.flip(-1)
        rows, cols = images.shape[-2:]
        limit = (int(self.shift * rows), int(self.shift * cols))
        if max(limit) > 0:
            dy, dx = (int(torch.randint(-m, m + 1, (), generator=generator)) for m in limit)
            seen = torch.roll(seen, (dy, dx), dims=(-2, -1))
        return seen


def _cross_entropy(targets: torch.Tensor, weight: float):
    def loss(output: torch.Tensor, rows: slice) -> torch.Tensor:
        return weight * F.cross_entropy(output.float(), targets[rows], reduction="sum") / len(targets)

    return loss


def _channel_bounds(pixel_range, channels: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The per-channel [low, high] the pixels are clipped to, as [1, C, 1, 1] tensors; (None, None) if unknown."""
    if pixel_range is None:
        return None, None
    bounds = torch.tensor(pixel_range, dtype=torch.float32, device=device)
    if bounds.dim() == 1:
        bounds = bounds.expand(channels, 2)
    return bounds[:, 0].view(1, -1, 1, 1), bounds[:, 1].view(1, -1, 1, 1)
