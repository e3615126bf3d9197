"""Labelled image folders -> preprocessed float32 NCHW arrays, for measuring accuracy of exported models."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np
from PIL import Image

from zeroquant.errors import UsageError
from zeroquant.optional import require
from zeroquant.zoo.registry import Preprocessing, zoo_entry

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class ImageSet:
    images: np.ndarray  # float32 NCHW, preprocessed
    labels: np.ndarray  # int64, -1 when unknown
    paths: list[str]


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _labelled_files(root: Path, labels: str | Path | None) -> list[tuple[Path, int]]:
    """(file, class index) in sorted order; the label scheme decides where the class comes from."""
    if labels is None:
        return [(p, -1) for p in _images_in(root, recursive=True)]
    if labels == "folders":
        classes = sorted(d for d in root.iterdir() if d.is_dir())
        return [(p, i) for i, d in enumerate(classes) for p in _images_in(d)]
    wnids_file = Path(labels)
    if not wnids_file.is_file():
        raise UsageError(f"wnids file not found: {wnids_file}")
    index = {w: i for i, w in enumerate(wnids_file.read_text().split())}
    files = []
    for p in _images_in(root):
        wnid = p.name.split("_", 1)[0]
        if wnid not in index:
            raise UsageError(f"image {p.name} starts with wnid '{wnid}', which is not in {wnids_file}")
        files.append((p, index[wnid]))
    return files


def _balanced(files: list[tuple[Path, int]], limit: int) -> list[tuple[Path, int]]:
    """The first `limit` files taken round-robin over classes, so a small subset still covers every class."""
    by_class = defaultdict(list)
    for item in files:
        by_class[item[1]].append(item)
    rounds = zip_longest(*(by_class[c] for c in sorted(by_class)))
    chosen = [item for row in rounds for item in row if item is not None][:limit]
    return sorted(chosen, key=lambda item: (item[1], item[0]))


def transform_for(prep: Preprocessing):
    """The torchvision pipeline that models.yaml's preprocessing entries describe (torchvision's own transforms, so
    images are prepared exactly as torchvision-trained models expect)."""
    transforms = require("torchvision.transforms", "vision", "reading evaluation images")
    return transforms.Compose([
        transforms.Resize(prep.resize),
        transforms.CenterCrop(prep.crop),
        transforms.ToTensor(),
        transforms.Normalize(prep.mean, prep.std),
    ])


def load_image_folder(
    path: str | Path, prep: Preprocessing, labels: str | Path | None = "folders", limit: int | None = None
) -> ImageSet:
    """Load and preprocess every image under `path` (or a class-balanced first `limit` of them).

    labels: "folders" (one sub-folder per class, index = sorted folder name), a wnids.txt path (flat folder of
    `<wnid>_*.JPEG`, index = line of the wnid), or None (unlabelled, searched recursively).
    """
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"image folder not found: {root}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, got {limit}")
    files = _labelled_files(root, labels)
    if not files:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    if limit is not None:
        files = _balanced(files, limit)
    transform = transform_for(prep)
    images = []
    # A plain loop: the transforms hold the GIL, so a thread pool measured no faster (~1 ms per CIFAR image).
    for p, _ in files:
        with Image.open(p) as image:
            images.append(transform(image.convert("RGB")).numpy())
    return ImageSet(
        images=np.stack(images).astype(np.float32, copy=False),
        labels=np.array([c for _, c in files], dtype=np.int64),
        paths=[str(p) for p, _ in files],
    )


def dataset_for_zoo(name: str, limit: int | None = None) -> ImageSet:
    """The evaluation set that models.yaml names for a zoo model, preprocessed the way that model expects."""
    entry = zoo_entry(name)
    if not entry.dataset:
        raise UsageError(f"zoo model '{name}' has no dataset in models.yaml", "pass an image folder instead")
    labels = entry.dataset.get("labels", "folders")
    if isinstance(labels, dict):
        labels = entry.resolve(labels["wnids"])
    return load_image_folder(entry.resolve(entry.dataset["path"]), entry.preprocessing, labels, limit)
