"""models.yaml: the registry of known models, their weights, input shape and preprocessing."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from zeroquant.errors import UsageError

ZOO_FILE_ENV = "ZEROQUANT_ZOO"


@dataclass(frozen=True)
class Preprocessing:
    """Image -> tensor recipe: resize the short side, centre-crop, scale to [0,1], normalise per channel."""

    name: str
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def channel_ranges(self) -> tuple[tuple[float, float], ...]:
        """What pixels in [0, 1] become, per channel."""
        return tuple(((0 - m) / s, (1 - m) / s) for m, s in zip(self.mean, self.std))

    def input_range(self) -> tuple[float, float]:
        """The exact range of the model's input, over all channels."""
        ranges = self.channel_ranges()
        return min(low for low, _ in ranges), max(high for _, high in ranges)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    arch: str
    arch_args: dict = field(hash=False)
    weights: dict | None = field(hash=False)
    input_shape: tuple[int, int, int]
    preprocessing: Preprocessing
    dataset: dict | None = field(default=None, hash=False)
    root: Path = Path(".")

    def resolve(self, relative: str) -> Path:
        """A path written in models.yaml is relative to the folder of models.yaml."""
        return (self.root / relative).resolve()


def zoo_file() -> Path:
    """ZEROQUANT_ZOO if set; else models.yaml at the repository root (a checkout or an editable install), else the
    copy an installed zeroquant keeps in <prefix>/share/zeroquant (whose ../shared paths a user rarely has)."""
    if ZOO_FILE_ENV in os.environ:
        return Path(os.environ[ZOO_FILE_ENV])
    checkout = Path(__file__).resolve().parents[2] / "models.yaml"
    return checkout if checkout.is_file() else Path(sys.prefix) / "share" / "zeroquant" / "models.yaml"


@cache
def _load(path: Path) -> tuple[dict[str, ZooEntry], dict[str, Preprocessing]]:
    raw = yaml.safe_load(path.read_text())
    preprocessing = {
        name: Preprocessing(name, int(p["resize"]), int(p["crop"]), tuple(p["mean"]), tuple(p["std"]))
        for name, p in raw["preprocessing"].items()
    }
    entries = {}
    for name, m in raw["models"].items():
        weights = m.get("weights")
        entries[name] = ZooEntry(
            name=name,
            description=m.get("description", ""),
            arch=m["arch"],
            arch_args=dict(m.get("arch_args", {})),
            weights=None if weights in (None, "none") else dict(weights),
            input_shape=tuple(int(v) for v in m["input_shape"]),
            preprocessing=preprocessing[m["preprocessing"]],
            dataset=m.get("dataset"),
            root=path.parent.resolve(),
        )
    return entries, preprocessing


def zoo_entries() -> dict[str, ZooEntry]:
    return _load(zoo_file())[0]


def preprocessings() -> dict[str, Preprocessing]:
    return _load(zoo_file())[1]


def zoo_entry(name: str) -> ZooEntry:
    entries = zoo_entries()
    if name not in entries:
        raise UsageError(f"unknown zoo model '{name}'", f"known: {', '.join(sorted(entries))}")
    return entries[name]


def preprocessing(name: str) -> Preprocessing:
    known = preprocessings()
    if name not in known:
        raise UsageError(f"unknown preprocessing '{name}'", f"known: {', '.join(sorted(known))}")
    return known[name]
