"""Calibration images distilled from BatchNorm statistics (no real data), behind one interface."""

from zeroquant.calib.base import CalibSet, DistillSettings, Distiller
from zeroquant.calib.genie import GenieDistiller
from zeroquant.calib.noise import NoiseDistiller
from zeroquant.calib.zeroq import ZeroQDistiller

DISTILLERS: dict[str, Distiller] = {d.name: d for d in (ZeroQDistiller(), GenieDistiller(), NoiseDistiller())}

__all__ = ["CalibSet", "DistillSettings", "Distiller", "DISTILLERS"]
