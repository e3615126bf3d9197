"""Peak resident memory of a default W8A8 quantize, measured from outside with GNU time (its "Maximum resident set
size"), for EfficientNet-Lite0 at 224 px and at 260 px. Writes the memory section of benchmarks/RESULTS.md.

    python benchmarks/memory.py [--shapes 224,260]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import provenance, provenance_lines, write_section  # noqa: E402  (a sibling script)
from timed_cli import run_zeroquant  # noqa: E402


def peak(size: int) -> dict:
    """One default quantize of zoo:efficientnet_lite0 at size x size, distilled from scratch (an empty cache)."""
    with tempfile.TemporaryDirectory() as folder:
        report, seconds, peak_gib = run_zeroquant(["quantize", "zoo:efficientnet_lite0", "--input-shape",
                                                   f"3,{size},{size}", "-o", f"{folder}/m.onnx"], f"{folder}/cache")
    return {"size": size, "peak_rss_gib": round(peak_gib, 3), "wall_s": round(seconds, 1),
            "distill_s": report["timings"]["distill"], "parity_agreement": report["parity"]["top1_agreement"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="224,260")
    parser.add_argument("--output", type=Path, default=HERE)
    args = parser.parse_args(argv)
    run = provenance()
    rows = [peak(int(size)) for size in args.shapes.split(",")]
    lines = ["## Peak memory of a default W8A8 quantize", "", *provenance_lines(run), "",
             "`/usr/bin/time -v zeroquant quantize zoo:efficientnet_lite0 --input-shape 3,S,S` with an empty cache "
             "(distillation included, which is where the peak is: its backward pass keeps every activation; "
             "batches that would keep more than 2 GiB run in exact micro-batches, calib/matching.py).", "",
             "| input | peak resident memory | wall s | distillation s |", "|---|--:|--:|--:|"]
    lines += [f"| {r['size']} px | {r['peak_rss_gib']:.2f} GiB | {r['wall_s']:.0f} | {r['distill_s']:.0f} |"
              for r in rows]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "memory.json").write_text(json.dumps({"run": run, "rows": rows}, indent=1) + "\n")
    write_section(args.output / "RESULTS.md", "memory", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
