"""Packed INT4 files against the same W4 weights stored as int8: file size, integer MAC share and batch-1 latency
(interleaved in one run, with the int8 W8A8 file and FP32 beside them). The weights come from one GPTQ W4A8
calibration-only quantize per model, exported both ways from the same distilled images. Writes the int4 section of
benchmarks/RESULTS.md.

    python benchmarks/int4.py [--models efficientnet_lite0,resnet20_cifar10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import bench_log, provenance, provenance_lines, write_section  # noqa: E402  (a sibling script)

import zeroquant  # noqa: E402
from zeroquant.cli.output import progress_display  # noqa: E402
from zeroquant.evaluate.latency import measure  # noqa: E402

W4 = dict(wbits=4, rounding="gptq", reconstruct="off")


def run_model(name: str, folder: Path, threads: int, progress) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"FP32": folder / "fp32.onnx", "W8A8 (int8)": folder / "w8a8.onnx",
             "W4A8 as int8": folder / "w4a8.onnx", "W4A8 packed INT4": folder / "w4a8-int4.onnx"}
    reports = {"W8A8 (int8)": zeroquant.quantize(f"zoo:{name}", files["W8A8 (int8)"],
                                                 float_output=files["FP32"], progress=progress).report,
               "W4A8 as int8": zeroquant.quantize(f"zoo:{name}", files["W4A8 as int8"], progress=progress,
                                                  **W4).report,
               "W4A8 packed INT4": zeroquant.quantize(f"zoo:{name}", files["W4A8 packed INT4"], progress=progress,
                                                      pack_int4=True, **W4).report}
    timings = measure(list(files.values()), threads=threads, progress=progress)
    fp32 = timings[0].median_ms
    return [{"variant": label, "bytes": path.stat().st_size, "median_ms": t.median_ms,
             "latency_vs_fp32": t.median_ms / fp32,
             "integer_mac_fraction": reports[label].census["integer_mac_fraction"] if label in reports else None}
            for (label, path), t in zip(files.items(), timings)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet20_cifar10")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=HERE.parent / "out" / "int4")
    parser.add_argument("--output", type=Path, default=HERE)
    args = parser.parse_args(argv)
    run = provenance()
    results = {}
    with progress_display() as progress:
        for name in args.models.split(","):
            bench_log(progress)(f"{name}: W8A8, W4A8 as int8, W4A8 packed INT4")
            results[name] = run_model(name, args.workdir / name, args.threads, progress)
    lines = ["## Packed INT4 files", "", *provenance_lines(run), "",
             f"W4A8 = `--wbits 4 --rounding gptq --reconstruct off` (first/last and depthwise layers at 8 bits); "
             f"packed = the same with `--pack-int4`: 4-bit weights as INT4 initializers widened by a Cast that "
             f"onnxruntime folds at load. Batch-1 latency, {args.threads} threads, interleaved.", "",
             "| model | file | MB | size / W8A8 | integer MACs | median ms | latency / FP32 |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for name, rows in results.items():
        w8 = next(r["bytes"] for r in rows if r["variant"] == "W8A8 (int8)")
        for r in rows:
            macs = "" if r["integer_mac_fraction"] is None else f"{100 * r['integer_mac_fraction']:.0f} %"
            lines.append(f"| {name} | {r['variant']} | {r['bytes'] / 1e6:.2f} | {r['bytes'] / w8:.2f} | {macs} | "
                         f"{r['median_ms']:.3f} | {r['latency_vs_fp32']:.2f} |")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "int4.json").write_text(json.dumps({"run": run, "models": results}, indent=1) + "\n")
    write_section(args.output / "RESULTS.md", "int4", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
