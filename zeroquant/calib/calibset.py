"""The calibration set: distilled images with how well they match the BN statistics, the calib.pt file they are
stored in (`zeroquant distill`, the cache), the settings that made them, and the contract every distiller keeps."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from zeroquant.errors import ModelLoadError, first_line
from zeroquant.progress import Progress


@dataclass
class DistillSettings:
    num_images: int = 32
    batch_size: int = 32
    iterations: int = 200
    lr: float = 0.2
    seed: int = 0
    pixel_range: tuple | None = None  # per channel (low, high), or one (low, high) for all: what pixels can be
    precision: str = "float32"  # the arithmetic of the network's passes: float32 or bfloat16 (autocast)

    def key(self) -> dict:
        return dict(vars(self))

    def batch_sizes(self) -> list[int]:
        return [min(self.batch_size, self.num_images - s) for s in range(0, self.num_images, self.batch_size)]


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of batch `index`: a function of the seed and the index only, so a batch comes out the same
    whichever process distils it and whatever was distilled before it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


@dataclass
class CalibSet:
    """Distilled images plus how well they match the BN statistics (per layer, for `inspect`)."""

    images: torch.Tensor
    method: str
    settings: dict
    final_loss: float = float("nan")
    layer_mismatch: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The calib.pt format (`zeroquant distill`, the cache): tensors and JSON text only, so it loads with
        torch.load(weights_only=True)."""
        buffer = io.BytesIO()
        torch.save({"images": self.images.contiguous(), "method": self.method, "settings": json.dumps(self.settings),
                    "final_loss": self.final_loss, "layer_mismatch": json.dumps(self.layer_mismatch)}, buffer)
        return buffer.getvalue()

    @classmethod
    def from_file(cls, path: str | Path) -> CalibSet:
        """Read a calib.pt; anything else is a ModelLoadError naming the file."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            images = data["images"]
            if not (isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point()):
                raise ValueError("'images' is not an N,C,H,W float tensor")
            return cls(images.float(), str(data["method"]), json.loads(data["settings"]), float(data["final_loss"]),
                       json.loads(data["layer_mismatch"]))
        except Exception as exc:
            raise ModelLoadError(f"cannot read calibration set {path}: {first_line(exc, 200)}",
                                 "give a calib.pt written by `zeroquant distill`") from exc


@dataclass
class Batch:
    """One distilled batch: its images, their final loss (BN terms plus the input prior) and each BN layer's."""

    images: torch.Tensor
    loss: float = float("nan")
    layers: dict[str, float] = field(default_factory=dict)


def calib_set(method: str, settings: DistillSettings, batches: dict[int, Batch]) -> CalibSet:
    """The batches, in index order, as one set: the mean loss over batches, and per BN layer."""
    ordered = [batches[i] for i in sorted(batches)]
    mismatch: dict[str, float] = {}
    for batch in ordered:
        for layer, value in batch.layers.items():
            mismatch[layer] = mismatch.get(layer, 0.0) + value / len(ordered)
    return CalibSet(torch.cat([b.images for b in ordered]), method, settings.key(),
                    sum(b.loss for b in ordered) / len(ordered), mismatch)


class Distiller(Protocol):
    name: str

    def key(self) -> dict:
        """The distiller's own settings that shape the images (part of the cache key)."""

    def distill(self, graph_module: torch.fx.GraphModule, input_shape: tuple[int, int, int],
                settings: DistillSettings, device: torch.device, progress: Progress,
                indices: list[int]) -> dict[int, Batch]:
        """The batches of the given indices (of settings.batch_sizes()), each a function of the seed and index."""
