"""What this CPU's integer dot products can do. It decides whether full-range int8 weights are safe (VNNI, AMX and ARM
dot-product instructions accumulate u8 x s8 products in int32; AVX2 and AVX-512 without VNNI add pairs of them in
int16 first, which saturates), and it is recorded beside every latency figure."""

from __future__ import annotations

import platform
import re
from functools import cache
from pathlib import Path

FEATURES = ("avx2", "avx512", "vnni", "amx", "arm_dotprod")


@cache
def cpu_info() -> dict:
    """The CPU's name and its integer-kernel features (all False where they cannot be read)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^(?:model name|Hardware|CPU part)\s*:\s*(.*)$", text, re.MULTILINE)
    flags = set()
    for line in re.findall(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE):
        flags |= set(line.split())
    return {"cpu": name.group(1).strip() if name else (platform.processor() or platform.machine() or "unknown"),
            "avx2": "avx2" in flags, "avx512": "avx512bw" in flags,
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}), "amx": "amx_int8" in flags,
            "arm_dotprod": "asimddp" in flags}


def int32_dot_products(info: dict | None = None) -> bool:
    """Whether onnxruntime's u8s8 kernels here accumulate in int32 (no saturation with full-range int8 weights)."""
    info = info or cpu_info()
    return info["vnni"] or info["amx"] or info["arm_dotprod"]


def cpu_flags(info: dict | None = None) -> str:
    """'AVX2 yes, AVX-512 yes, VNNI no, AMX no' (and ARM dot product on ARM), for reports and benchmark tables."""
    info = info or cpu_info()
    names = {"avx2": "AVX2", "avx512": "AVX-512", "vnni": "VNNI", "amx": "AMX", "arm_dotprod": "ARM dot product"}
    shown = [k for k in FEATURES if k != "arm_dotprod" or info.get(k)]
    return ", ".join(f"{names[k]} {'yes' if info.get(k) else 'no'}" for k in shown)


WEIGHT_GRID = "zeroquant.weight_grid"  # ONNX metadata_props key: "int32-dot" (full int8 weights) or "portable"


def grid_warning(grid: str | None, info: dict | None = None) -> str | None:
    """One line when a file whose weights need int32 dot products (its WEIGHT_GRID) runs on a CPU without them,
    where onnxruntime's u8s8 kernels can saturate and its accuracy silently drops; None when it suits this CPU."""
    if grid != "int32-dot" or int32_dot_products(info):
        return None
    return (f"this file was quantized for CPUs with int32 dot products (--target-cpu int32-dot: x86 VNNI or AMX, ARM "
            f"dot product) and this CPU has none ({cpu_flags(info)}): its accuracy can drop here; quantize with "
            "--target-cpu portable for such CPUs")
