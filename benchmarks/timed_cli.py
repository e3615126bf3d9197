"""A zeroquant command run as a user runs it, under GNU time: its --json result, wall seconds and peak resident
memory ("Maximum resident set size"), with the distillation cache the caller chooses (memory.py, effort.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

ZEROQUANT = Path(sys.executable).with_name("zeroquant")


def run_zeroquant(args: list[str], cache: Path | str) -> tuple[dict, float, float]:
    """`zeroquant ARGS --json` with ZEROQUANT_CACHE=cache: (its JSON output, wall seconds, peak resident GiB)."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", str(ZEROQUANT), *args, "--json"], capture_output=True, text=True,
                          env={"ZEROQUANT_CACHE": str(cache), "PATH": "/usr/bin:/bin"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"`zeroquant {' '.join(args)}` failed: {done.stderr[-2000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return json.loads(done.stdout), seconds, rss_kib / 2**20
