"""Model inversion with the levers of DeepInversion (Yin et al. 2020) and Sony MCT's data generation on ZeroQ's loss:
free pixels like ZeroQ, but every step sees the batch randomly shifted (circular roll) and flipped, so the pixels
cannot fit one sampling grid; a cross-entropy term towards a random class per image, so the batch is not all one
class and the logits have realistic range; pixels clipped to the range the preprocessing can produce; and a
cosine-decayed learning rate. What else decides how well the images calibrate (EfficientNet-Lite0 W4A8 and ResNet-20
W4A4, GPTQ, benchmarks/data_quality.py): the start (noise drawn 8x coarser and upsampled, not pixel noise that 50
steps cannot remove), the first BN layer's weight (10x: it is 0.2 % of the summed loss on real photos, so plain
matching leaves the images' low-level statistics as far off as noise's), and at high resolution a total-variation
term (photos at 224 px are smooth: neighbour differences 0.30 of their spread, Lite0's images without it 1.85; top-1
78.4 -> 82.0 with it, where real photos give 83.2). At CIFAR's 32 px photos are rougher (0.48) and the same term
cost ResNet-20 6 points, so it is on only above 64x64 px. `coarse` spends the first part of the steps at half
resolution; it measured worse on Lite0, so it is off. The BN loss is matching.py's, so final losses compare with
ZeroQ's and Genie's.
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
    output_weight: float = 3.0  # weight of the cross-entropy to each image's random class (0: BN loss only)
    coarse: float = 0.0  # fraction of the steps spent at half resolution (off: it measured worse on Lite0)
    first_bn: float = 10.0  # weight of the first BN layer's loss in the gradient (DeepInversion's too)
    tv: float | None = None  # the total variation's gradient relative to the matching one's (None: by resolution)
    smooth_start: int = 8  # the starting noise is drawn this many times coarser, then upsampled (1: pixel noise)

    def key(self) -> dict:
        """What shapes the images besides DistillSettings (part of the cache key)."""
        return {"shift": self.shift, "flip": self.flip, "output_weight": self.output_weight, "coarse": self.coarse,
                "first_bn": self.first_bn, "tv": self.tv, "smooth_start": self.smooth_start}

    def distill(self, graph_module, input_shape, settings: DistillSettings, device, progress,
                indices: list[int]) -> dict[int, Batch]:
        device = torch.device(device)
        matcher = BatchNormMatcher(graph_module, input_shape, device, precision=settings.precision)
        matcher.taps[0].emphasis = self.first_bn
        smoothing = self.smoothing(input_shape)
        low, high = _channel_bounds(settings.pixel_range, input_shape[0], device)
        output = matcher.outputs(torch.zeros(1, *input_shape, device=device))
        classes = output.shape[1] if isinstance(output, torch.Tensor) and output.dim() == 2 else 0

        def distill_batch(size: int, generator: torch.Generator, advance) -> torch.Tensor:
            channels, rows, cols = input_shape
            coarse_steps = int(round(self.coarse * settings.iterations)) if min(rows, cols) >= 64 else 0
            start = (rows // 2, cols // 2) if coarse_steps else (rows, cols)
            coarse_start = [max(1, side // self.smooth_start) for side in start]
            images = torch.randn(size, channels, *coarse_start, generator=generator).to(device)
            if coarse_start != list(start):
                images = F.interpolate(images, size=start, mode="bilinear", align_corners=False)
                images = images / images.std()
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
                    if smoothing:
                        images.grad += _smoothing(images, step.grad, smoothing)
                    optimizer.step()
                    schedule.step()
                    if low is not None:
                        with torch.no_grad():
                            images.copy_(torch.maximum(torch.minimum(images, high), low))
                    advance()
            return images.detach()

        return distill_batches("Inversion", matcher, settings, distill_batch, progress, indices)

    def smoothing(self, input_shape) -> float:
        """The total-variation weight for this input size: `tv`, or by default 0.5 above 64x64 px (photos at that
        resolution are smooth) and none at or below it (CIFAR's 32 px are not, and smoothing cost 6 points)."""
        if self.tv is not None:
            return self.tv
        return 0.5 if input_shape[-2] * input_shape[-1] > 64 * 64 else 0.0

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


def _smoothing(images: torch.Tensor, matching: torch.Tensor, weight: float) -> torch.Tensor:
    """The total variation's gradient, scaled to `weight` times the matching gradient's norm: the BN loss's scale
    differs by orders of magnitude between nets, so a fixed weight that suits one smears another's images."""
    with torch.enable_grad():
        smoothing, = torch.autograd.grad(_total_variation(images), images)
    return smoothing * (weight * matching.norm() / smoothing.norm().clamp_min(1e-12))


def _total_variation(images: torch.Tensor) -> torch.Tensor:
    return torch.norm(images[..., 1:, :] - images[..., :-1, :]) + torch.norm(images[..., 1:] - images[..., :-1])


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
