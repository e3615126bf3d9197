"""zeroquant: data-free quantization of trained BatchNorm CNNs into verified integer ONNX models for the CPU.

    import zeroquant
    result = zeroquant.quantize(model, input_shape=(3, 224, 224), output="model.onnx")  # nn.Module, program, path
    frontier = zeroquant.pareto(model, input_shape=(3, 224, 224), wbits_choices=(2, 3, 4, 6, 8))
    images = zeroquant.distill(model, input_shape=(3, 224, 224), method="genie")

Options are the CLI's flags as keywords (see QuantizeOptions); failures raise the typed errors of zeroquant.errors.
The functions are imported on first use, so `import zeroquant` (and the CLI's start) stays fast.
"""

from __future__ import annotations

import importlib
import importlib.metadata

try:
    __version__ = importlib.metadata.version("zeroquant")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+source"

_PUBLIC = {
    "quantize": "zeroquant.pipeline", "pareto": "zeroquant.pipeline", "distill": "zeroquant.pipeline",
    "inspect": "zeroquant.pipeline", "QuantizeOptions": "zeroquant.options", "QuantizeResult": "zeroquant.report",
    "QuantizeReport": "zeroquant.report", "ParetoResult": "zeroquant.search.result", "CalibSet": "zeroquant.calib",
    "ProgressEvent": "zeroquant.progress", "ZeroQuantError": "zeroquant.errors", "UsageError": "zeroquant.errors",
    "ModelLoadError": "zeroquant.errors", "UnsupportedModelError": "zeroquant.errors",
    "VerificationError": "zeroquant.errors", "OutputError": "zeroquant.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'zeroquant' has no attribute '{name}'")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return __all__
