"""Packages only some features need (torchvision, the EfficientNet weight packages), imported when first used, so a
bare `pip install zeroquant` quantizes the user's own models beside whatever torch they have."""

from __future__ import annotations

import importlib
from types import ModuleType

from zeroquant.errors import UsageError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or fail with one line that names the extra which installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"{purpose} needs the package {module.split('.')[0]}, which is not installed (or does not "
                         f"import: {exc})", f"pip install 'zeroquant[{extra}]'") from exc
