"""A PNG grid of distilled images, to see what the network was calibrated on."""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from PIL import Image

from zeroquant.errors import UsageError
from zeroquant.optional import require

PADDING = 2
MIN_SIDE = 64  # small images (CIFAR's 32 px) are enlarged by whole pixels to at least this


def to_pixels(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Values in [0, 1]: undo the model's normalisation when it is known, else stretch each image to its range."""
    if mean is not None and std is not None and len(mean) == images.shape[1]:
        shape = (1, -1, 1, 1)
        return (images * torch.tensor(std).reshape(shape) + torch.tensor(mean).reshape(shape)).clamp(0, 1)
    low = images.amin((1, 2, 3), keepdim=True)
    high = images.amax((1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(1e-8)


def check_channels(channels: int) -> None:
    """Before distilling: a PNG holds grey or RGB images only."""
    if channels not in (1, 3):
        raise UsageError(f"cannot preview {channels}-channel images", "--preview needs 1 or 3 input channels")


def grid_png(images: torch.Tensor, mean=None, std=None) -> bytes:
    """A near-square grid (ceil(sqrt(n)) per row, PADDING px between images) of N,C,H,W images, as PNG."""
    check_channels(images.shape[1])
    pixels = to_pixels(images.detach().float().cpu(), mean, std)
    scale = max(1, math.ceil(MIN_SIDE / min(pixels.shape[2:])))
    if scale > 1:
        pixels = F.interpolate(pixels, scale_factor=scale, mode="nearest")
    make_grid = require("torchvision.utils", "vision", "--preview").make_grid
    grid = make_grid(pixels, nrow=math.ceil(math.sqrt(len(pixels))), padding=PADDING)
    array = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
