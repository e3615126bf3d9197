"""Calibration images distilled from BatchNorm statistics (no real data), behind one interface, with a cache."""

from __future__ import annotations

import torch

from zeroquant.calib import cache
from zeroquant.calib.calibset import CalibSet, DistillSettings, Distiller, calib_set
from zeroquant.calib.genie import GenieDistiller
from zeroquant.calib.inversion import InversionDistiller
from zeroquant.calib.noise import NoiseDistiller
from zeroquant.calib.zeroq import ZeroQDistiller
from zeroquant.errors import UnsupportedModelError
from zeroquant.graph.batchnorm import batchnorm_nodes
from zeroquant.distributed import Workers
from zeroquant.progress import SILENT, Progress

DISTILLERS: dict[str, Distiller] = {d.name: d for d in (ZeroQDistiller(), GenieDistiller(), InversionDistiller(),
                                                        NoiseDistiller())}

__all__ = ["CalibSet", "DistillSettings", "Distiller", "DISTILLERS", "default_iterations", "distill"]


def default_iterations(input_shape) -> int:
    """Measured on this project's CPU budget: small inputs converge in 200 Adam steps; 224 px nets get fewer
    steps on the same clock (the BN loss plateaus early there, see benchmarks/RESULTS.md). ZeroQ and inversion cost
    the same per step (Lite0, batch 32: 5.17 and 5.25 s on 2 threads)."""
    return 200 if input_shape[1] * input_shape[2] <= 64 * 64 else 50


def distill(graph_module: torch.fx.GraphModule, input_shape, method: str | Distiller, settings: DistillSettings,
            device: torch.device, model_digest: str, use_cache: bool = True, progress: Progress = SILENT,
            workers: Workers = Workers()) -> tuple[CalibSet, bool]:
    """Distilled calibration images, from the cache when the same model and settings were distilled before;
    returns the set and whether it came from the cache. With several processes each distils its share of the
    batches and all of them get the whole set: the same images as one process makes. `method`: a name of
    DISTILLERS, or a distiller (one with other settings than the registered one's)."""
    distiller = DISTILLERS[method] if isinstance(method, str) else method
    method = distiller.name
    if method != "noise" and not batchnorm_nodes(graph_module):
        raise UnsupportedModelError(
            "the model has no BatchNorm layers, so there are no statistics to distill calibration images from",
            "use --method noise (Gaussian-noise calibration)")
    key = cache.cache_key(model_digest, method, settings.key() | {"distiller": distiller.key()}, input_shape,
                          device.type)
    cached = cache.load(key) if use_cache else None
    if workers.agree(cached is not None):
        return cached, True
    share = workers.share(len(settings.batch_sizes()))
    batches = workers.run(lambda: distiller.distill(graph_module, input_shape, settings, device, progress,
                                                     share))
    calib = calib_set(method, settings, workers.gather(batches))
    if use_cache and workers.is_main:
        cache.store(key, calib)
    return calib, False
