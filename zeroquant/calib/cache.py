"""Cache of distilled calibration sets, keyed by a hash of the model and every setting that shapes the images."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

from zeroquant.calib.calibset import CalibSet
from zeroquant.errors import ModelLoadError, OutputError
from zeroquant.files import cache_root, write_atomic

FORMAT = 2


def cache_dir() -> Path:
    return cache_root() / "calib"


@cache
def distiller_source() -> str:
    """A hash of the code that makes the images (this package's modules). The model digest already holds
    zeroquant's version; this also tells apart two builds of one version (a source checkout, a patched install),
    which would otherwise reuse each other's images."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(model_digest: str, method: str, settings: dict, input_shape, device: str) -> str:
    payload = json.dumps([FORMAT, model_digest, distiller_source(), method, settings, list(input_shape), device],
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load(key: str) -> CalibSet | None:
    path = cache_dir() / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        return CalibSet.from_file(path)
    except ModelLoadError:  # a damaged entry is only a cache miss
        return None


def store(key: str, calib: CalibSet) -> bool:
    """Keep the set for next time; False when the cache folder cannot be written (the run goes on without it)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{key}.pt", calib.to_bytes())
    except (OSError, OutputError):
        return False
    return True
