"""Genie distillation (Jeon et al., CVPR 2023): a generator and per-image latent vectors, trained jointly so that
every BN layer sees its running statistics, with "swing" convolutions against aliasing in strided convs.

Differences from ZeroQ (zeroq.py): the images are the output of a small convolutional generator G(z) instead of
free pixels, so neighbouring pixels are correlated from the start and the optimisation moves a smooth image
manifold rather than per-pixel noise; and every strided conv of the distillation graph sees its input shifted by
a random offset each step (pad by one pixel, crop back), so the images cannot exploit the sub-sampling grid.
Each batch gets a fresh generator and fresh latents. The loss is ZeroQ's (the BN taps of base.py plus
the input prior), so the two methods' final losses compare directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zeroquant.calib.calibset import Batch, DistillSettings
from zeroquant.calib.matching import BatchNormMatcher, distill_batches

aten = torch.ops.aten
_CONVS = (aten.conv2d.default, aten.convolution.default)


class Swing(nn.Module):
    """Shifts its input by an offset in [-max_shift, max_shift] along H and W (pad, then crop back to the same size).
    `resample()` draws a fresh offset from `generator` (once per distillation step, so that every micro-batch and
    pass of the step sees the same one); `center()` sets it to no shift. With max_shift 0 it is the identity."""

    def __init__(self, generator: torch.Generator | None = None, max_shift: int = 1, mode: str = "reflect"):
        super().__init__()
        self.generator, self.max_shift, self.mode = generator, max_shift, mode
        self.offset = (max_shift, max_shift)

    def resample(self) -> None:
        self.offset = tuple(torch.randint(0, 2 * self.max_shift + 1, (2,), generator=self.generator).tolist())

    def center(self) -> None:
        self.offset = (self.max_shift, self.max_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.max_shift
        dy, dx = self.offset
        if s == 0 or (dy == s and dx == s):
            return x
        height, width = x.shape[-2:]
        mode = self.mode if min(height, width) > s else "replicate"  # reflection needs more pixels than the pad
        padded = F.pad(x, (s, s, s, s), mode=mode)
        return padded[..., dy:dy + height, dx:dx + width]


def _stride(node: torch.fx.Node) -> list[int]:
    stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
    return list(stride) if isinstance(stride, (list, tuple)) else [int(stride)]


def swing_strided_convs(graph_module: torch.fx.GraphModule, generator: torch.Generator | None = None,
                        max_shift: int = 1, mode: str = "reflect") -> list[str]:
    """Insert a `Swing` module before the input of every conv with a stride above 1 (in place; for the
    distillation copy of the graph only). Returns the names of the inserted modules, in graph order."""
    names = []
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target not in _CONVS or max(_stride(node)) <= 1:
            continue
        name = f"swing_{len(names)}"
        while hasattr(graph_module, name):
            name += "_"
        graph_module.add_submodule(name, Swing(generator, max_shift, mode))
        source = node.args[0]
        with graph_module.graph.inserting_before(node):
            shifted = graph_module.graph.call_module(name, (source,))
        shifted.meta = dict(source.meta) if isinstance(source, torch.fx.Node) else {}
        node.args = (shifted, *node.args[1:])
        names.append(name)
    graph_module.graph.lint()
    graph_module.recompile()
    return names


class ImageGenerator(nn.Module):
    """latent -> linear -> low-resolution feature map (side <= 8) -> (upsample x2, conv3x3, BN, LeakyReLU) stages
    up to the input size -> conv3x3 to C channels -> BN without affine parameters (per-channel zero mean and unit
    std over the batch: the statistics of normalised images, so no tanh squashing). BNs use batch statistics."""

    def __init__(self, input_shape: tuple[int, int, int], latent_dim: int = 256, width: int = 64,
                 min_width: int = 32):
        super().__init__()
        channels, rows, cols = input_shape
        stages = max(1, math.ceil(math.log2(max(rows, cols) / 8)))
        sizes = [(math.ceil(rows / 2 ** k), math.ceil(cols / 2 ** k)) for k in range(stages, -1, -1)]
        self.low = sizes[0]
        self.width = width
        self.linear = nn.Linear(latent_dim, width * self.low[0] * self.low[1])
        layers: list[nn.Module] = [nn.BatchNorm2d(width)]
        c = width
        for size in sizes[1:]:
            out = max(min_width, c // 2)
            layers += [nn.Upsample(size=size, mode="nearest"), nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2)]
            c = out
        layers += [nn.Conv2d(c, channels, 3, padding=1), nn.BatchNorm2d(channels, affine=False)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.linear(z).view(len(z), self.width, *self.low))


class GenieDistiller:
    """Genie-D on this project's loss: per batch, `settings.iterations` Adam steps on a fresh generator and fresh
    latents (cosine-decayed learning rates); the calibration images are the trained generator's output.

    Learning rates scale with settings.lr (ZeroQ's pixel learning rate, 0.2 by default): latents get
    `latent_lr * settings.lr / 0.2`, generator weights `generator_lr * settings.lr / 0.2`. The default ratio
    (latents 10x the generator) is the one the Genie authors' code runs with; the result is insensitive to it
    (ResNet-20, 50 steps: final loss 14.5 to 15.5 for latent lr 0.03 to 1 and generator lr 0.003 to 0.01)."""

    name = "genie"

    def __init__(self, latent_dim: int = 256, width: int = 64, latent_lr: float = 0.1, generator_lr: float = 0.01,
                 max_shift: int = 1, swing: bool = True):
        self.latent_dim, self.width = latent_dim, width
        self.latent_lr, self.generator_lr = latent_lr, generator_lr
        self.max_shift, self.swing = max_shift, swing

    def key(self) -> dict:
        return dict(vars(self))

    def distill(self, graph_module, input_shape, settings: DistillSettings, device, progress,
                indices: list[int]) -> dict[int, Batch]:
        device = torch.device(device)
        matcher = BatchNormMatcher(graph_module, input_shape, device, precision=settings.precision)
        swings = []
        if self.swing:
            names = swing_strided_convs(matcher.model, None, self.max_shift)
            swings = [matcher.model.get_submodule(name) for name in names]
        scale = settings.lr / 0.2

        def distill_batch(size: int, seeds: torch.Generator, advance) -> torch.Tensor:
            batch_seed = int(torch.randint(0, 2 ** 62, (1,), generator=seeds))
            with torch.random.fork_rng(devices=[]):  # seeded weight init that leaves the global RNG alone
                torch.manual_seed(batch_seed)
                generator = ImageGenerator(input_shape, self.latent_dim, self.width)
            generator = generator.to(device).train()  # its BNs normalise with the statistics of this batch
            latents = torch.randn(size, self.latent_dim, generator=seeds).to(device).requires_grad_(True)
            for swing in swings:
                swing.generator = seeds
            optimizer = torch.optim.Adam([{"params": [latents], "lr": self.latent_lr * scale},
                                          {"params": generator.parameters(), "lr": self.generator_lr * scale}])
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, settings.iterations))
            for _ in range(settings.iterations):
                optimizer.zero_grad(set_to_none=True)
                for swing in swings:
                    swing.resample()
                images = generator(latents)
                step = matcher.step(images)
                ((images * step.grad).sum() + matcher.prior_loss(images)).backward()
                optimizer.step()
                schedule.step()
                advance()
            for swing in swings:  # the images are judged without shifts
                swing.center()
            with torch.no_grad():
                return generator(latents)

        return distill_batches("Genie", matcher, settings, distill_batch, progress, indices)
