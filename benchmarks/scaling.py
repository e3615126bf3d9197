"""Scale-out: the same jobs with 1 and with N processes (`--workers N`, gloo on the CPU, or torchrun on GPUs), timed
from outside, each from an empty cache: EfficientNet-Lite0's distillation (32 images, 224 px), a ResNet-20 W8A8 and
a ResNet-20 W4A4 quantize with GPTQ and block reconstruction (fast effort). Also checks that the W8A8 files are
byte-identical. Writes the scaling section of benchmarks/RESULTS.md.

    python benchmarks/scaling.py [--workers 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import provenance, provenance_lines, write_section  # noqa: E402  (a sibling script)

ZEROQUANT = Path(sys.executable).with_name("zeroquant")
JOBS = {  # label: arguments after the command, and what the job measures
    "Lite0 distillation (32 images, 224 px, 50 steps)": ["distill", "zoo:efficientnet_lite0", "-o", "{out}/calib.pt"],
    "ResNet-20 W8A8 quantize": ["quantize", "zoo:resnet20_cifar10", "-o", "{out}/w8a8.onnx"],
    "ResNet-20 W4A4 quantize (GPTQ + reconstruction, fast effort)": [
        "quantize", "zoo:resnet20_cifar10", "-o", "{out}/w4a4.onnx", "--wbits", "4", "--abits", "4",
        "--effort", "fast"],
}


def timed(args: list[str], workers: int, device: str, folder: str) -> float:
    command = [str(ZEROQUANT), *[a.format(out=folder) for a in args], "--device", device, "--workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env=os.environ | {"ZEROQUANT_CACHE": f"{folder}/cache"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", help="run only the jobs whose label contains this text")
    parser.add_argument("--output", type=Path, default=HERE)
    args = parser.parse_args(argv)
    run = provenance()
    rows, digests = [], {}
    for label, job in ((label, job) for label, job in JOBS.items() if not args.only or args.only in label):
        seconds = {}
        for workers in (1, args.workers):
            with tempfile.TemporaryDirectory() as folder:
                seconds[workers] = round(timed(job, workers, args.device, folder), 1)
                if "w8a8" in " ".join(job):
                    digests[workers] = hashlib.sha256(Path(folder, "w8a8.onnx").read_bytes()).hexdigest()
        rows.append({"job": label, "seconds": seconds})
    identical = len(set(digests.values())) == 1
    lines = ["## Scale-out: 1 process against several", "", *provenance_lines(run), "",
             f"Wall time of each command from an empty cache, `--workers N` (N local processes over gloo, "
             f"device {args.device}; each process gets cores / N threads). The W8A8 files of 1 and {args.workers} "
             f"processes are {'byte-identical' if identical else 'DIFFERENT'}.", "",
             f"| job | 1 process s | {args.workers} processes s | speed-up |", "|---|--:|--:|--:|"]
    for row in rows:
        one, many = row["seconds"][1], row["seconds"][args.workers]
        lines.append(f"| {row['job']} | {one:.0f} | {many:.0f} | {one / many:.2f}x |")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "scaling.json").write_text(json.dumps({"run": run, "rows": rows, "identical": identical},
                                                         indent=1) + "\n")
    write_section(args.output / "RESULTS.md", "scaling", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
