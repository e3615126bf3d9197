"""Which torch device the heavy stages (distillation, sensitivity, reconstruction) run on."""

from __future__ import annotations

import torch

from zeroquant.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """auto: the CUDA device when there is one (this process's own under torchrun, see distributed.py), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available", "use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device '{name}'", "choose auto, cpu or cuda")
    return torch.device(name, torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")
