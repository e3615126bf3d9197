"""Cache of distilled calibration sets, keyed by a hash of the model and every setting that shapes the images."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch

from zeroquant.calib.base import CalibSet
from zeroquant.export.onnx_export import write_atomic

CACHE_ENV = "ZEROQUANT_CACHE"
FORMAT = 1


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zeroquant"
    return Path(os.environ.get(CACHE_ENV, default)) / "calib"


def cache_key(model_digest: str, method: str, settings: dict, input_shape, device: str) -> str:
    payload = json.dumps([FORMAT, model_digest, method, settings, list(input_shape), device], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load(key: str) -> CalibSet | None:
    path = cache_dir() / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        return CalibSet(data["images"], data["method"], json.loads(data["settings"]), float(data["final_loss"]),
                        json.loads(data["layer_mismatch"]))
    except Exception:  # a damaged entry is only a cache miss
        return None


def store(key: str, calib: CalibSet) -> None:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"images": calib.images, "method": calib.method, "settings": json.dumps(calib.settings),
                "final_loss": calib.final_loss, "layer_mismatch": json.dumps(calib.layer_mismatch)}, buffer)
    write_atomic(folder / f"{key}.pt", buffer.getvalue())
