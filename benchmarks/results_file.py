"""benchmarks/RESULTS.md holds one section per benchmark script; each run replaces its own section whole and keeps
the others, so every table carries the date, machine, versions and exact command that produced it."""

from __future__ import annotations

import datetime
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime
import torch

from zeroquant.cpu import cpu_flags, cpu_info

HERE = Path(__file__).resolve().parent
TITLE = "# Benchmarks\n"


def bench_log(progress):
    """Log lines on stderr, above the progress bars when there are any."""
    from rich.console import Console

    return (getattr(progress, "console", None) or Console(stderr=True)).log


def machine() -> dict:
    return cpu_info() | {"cores": os.cpu_count(), "load_average": os.getloadavg()}


def versions() -> dict:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " (with uncommitted changes)" if git("status", "--porcelain") else ""
    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "zeroquant": commit + dirty}


def provenance() -> dict:
    """Date, machine, versions and command of this run (results.json keeps them beside the figures)."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
            "versions": versions(), "command": shlex.join(["python", *sys.argv])}


def machine_text(machine: dict) -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, AVX2 yes, ...': the CPU and the flags its latency figures depend on."""
    return f"{machine['cpu']}, {machine['cores']} cores, {cpu_flags(machine)}"


def provenance_lines(results: dict) -> list[str]:
    m, v = results["machine"], results["versions"]
    return [
        f"- date: {results['date']}"
        + (f"; whole run {results['wall_s'] / 60:.1f} min" if "wall_s" in results else ""),
        f"- machine: {machine_text(m)}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average'])}",
        f"- versions: torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, zeroquant {v['zeroquant']}",
        f"- command: `{results['command']}`",
    ]


def write_section(path: Path, name: str, markdown: str) -> None:
    """Put `markdown` between this section's markers in `path`, replacing what an earlier run wrote there."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else TITLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
