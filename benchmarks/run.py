"""zeroquant against onnxruntime's own quantizers on the zoo models; writes benchmarks/RESULTS.md and results.json.

Every variant of a model is built, evaluated and timed in the same run, and latency is measured interleaved across
all of them, so the ratios to FP32 compare like with like on a shared, noisy machine.

    python benchmarks/run.py [--quick] [--models resnet20_cifar10,...] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from zeroquant.evaluate.accuracy import evaluate_logits
from zeroquant.runtime import predict, session
from zeroquant.evaluate.datasets import dataset_for_zoo, load_image_folder
from zeroquant.census import kernel_census
from zeroquant.evaluate.latency import kind_rows, measure, time_by_kind
from zeroquant.cli.output import progress_display
from zeroquant.options import QuantizeOptions
from zeroquant.pipeline import quantize
from zeroquant.zoo.loading import LoadedModel, load_model
from zeroquant.zoo.registry import ZooEntry, zoo_entry

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ort_baselines import ort_dynamic, ort_static  # noqa: E402  (sibling scripts, not a package)
from results_file import bench_log, provenance, provenance_lines, write_section  # noqa: E402


@dataclass
class Setup:
    """How a model is calibrated and evaluated: full sizes, and the smaller ones --quick uses."""

    noise_images: int  # Gaussian-noise calibration images for ORT static
    real_images: int  # real calibration images for ORT static
    real_calib: Callable[[ZooEntry, int], np.ndarray]
    quick_real: int
    quick_eval: int  # evaluation images with --quick (else the whole zoo dataset)
    note: str = ""


def _cifar_calib(entry: ZooEntry, limit: int) -> np.ndarray:
    return load_image_folder(entry.resolve("../shared/data/cifar10/calib"), entry.preprocessing, limit=limit).images


CIFAR = Setup(128, 1000, _cifar_calib, quick_real=200, quick_eval=1000)
MODELS = {
    "resnet20_cifar10": CIFAR,
    "resnet32_cifar10": CIFAR,
    "efficientnet_lite0": Setup(
        32, 256, lambda entry, limit: dataset_for_zoo(entry.name, limit).images, quick_real=64, quick_eval=100,
        note="The real-data calibration images are a class-balanced subset of the 500 evaluation images (there is "
             "no separate ImageNet calibration set in ../shared), so the ORT real-calibration rows are optimistic."),
}


@dataclass
class Job:
    """What a variant's builder gets."""

    loaded: LoadedModel
    fp32: Path  # written by the first zeroquant variant (its --float-output)
    noise: np.ndarray
    real: np.ndarray
    use_cache: bool  # reuse a distilled set zeroquant cached before (--quick only)
    progress: object = None  # a rich Progress, or None


Builder = Callable[[Job, Path], float]  # writes the model, returns the quantization wall time in seconds


def zeroquant(options: QuantizeOptions) -> Builder:
    """Timed from scratch unless --quick: a cached distilled set would hide the distillation time."""

    def build(job: Job, output: Path) -> float:
        fp32 = None if job.fp32.exists() else job.fp32
        result = quantize(job.loaded, output, options=replace(options, cache=job.use_cache), progress=job.progress,
                          float_output=fp32)
        return result.report.timings["total"]

    return build


# More zeroquant rows (W4A8, W4A4, mixed precision) are one line each here.
ZEROQUANT: list[tuple[str, Builder]] = [
    ("zeroquant W8A8", zeroquant(QuantizeOptions())),
    ("zeroquant W8A8, ZeroQ images (the default before 0.2.0)", zeroquant(QuantizeOptions(method="zeroq")))]
ORT: list[tuple[str, Builder]] = [
    ("ORT dynamic", lambda job, out: ort_dynamic(job.fp32, out)),
    ("ORT static, noise calib", lambda job, out: ort_static(job.fp32, out, job.noise)),
    ("ORT static, real calib", lambda job, out: ort_static(job.fp32, out, job.real)),
    ("ORT static, real calib, reduce_range", lambda job, out: ort_static(job.fp32, out, job.real, reduce_range=True)),
]


def run_model(name: str, setup: Setup, args, progress, log) -> dict:
    entry = zoo_entry(name)
    folder = args.workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "fp32.onnx"
    fp32.unlink(missing_ok=True)
    real_images = setup.quick_real if args.quick else setup.real_images
    log(f"{name}: loading images")
    data = dataset_for_zoo(name, setup.quick_eval if args.quick else None)
    noise = np.random.default_rng(0).standard_normal((setup.noise_images, *entry.input_shape), dtype=np.float32)
    job = Job(load_model(f"zoo:{name}"), fp32, noise, setup.real_calib(entry, real_images), args.quick, progress)
    paths, seconds = {"FP32": fp32}, {"FP32": None}
    for variant, build in ZEROQUANT + ORT:  # zeroquant first: it writes the FP32 file
        log(f"{name}: {variant}")
        paths[variant] = folder / (re.sub(r"\W+", "_", variant).strip("_").lower() + ".onnx")
        seconds[variant] = round(build(job, paths[variant]), 2)
    order = ["FP32", *(v for v, _ in ORT), *(v for v, _ in ZEROQUANT)]
    log(f"{name}: latency, interleaved over {len(order)} models")
    latency = dict(zip(order, measure([paths[v] for v in order], 1, args.threads, seconds=args.latency_seconds,
                                      progress=progress)))
    log(f"{name}: profiling {', '.join(PROFILED)}")
    profile_runs = min(latency["FP32"].runs, 200)
    by_kind = {v: [k.to_dict() for k in time_by_kind(paths[v], 1, args.threads, profile_runs)] for v in PROFILED}
    reference = predict(session(fp32, args.threads), data.images)
    rows = []
    for variant in order:
        log(f"{name}: evaluating {variant} on {len(data.labels)} images")
        logits = predict(session(paths[variant], args.threads), data.images)
        top1, _, agreement = evaluate_logits(logits, data.labels, reference)
        census = kernel_census(paths[variant])
        size = paths[variant].stat().st_size
        rows.append({
            "variant": variant, "file": os.path.relpath(paths[variant], HERE.parent), "top1": round(top1, 2),
            "agreement": round(agreement, 2), "bytes": size, "size_ratio": size / fp32.stat().st_size,
            "latency_ms": {k: v for k, v in latency[variant].to_dict().items() if k != "path"},
            "latency_ratio": latency[variant].median_ms / latency["FP32"].median_ms,
            "integer_mac_fraction": census["integer_mac_fraction"], "integer_kernels": census["integer_kernels"],
            "quantize_s": seconds[variant],
        })
    return {"eval_images": len(data.labels), "noise_calib_images": len(noise), "real_calib_images": len(job.real),
            "latency_runs": latency["FP32"].runs, "note": setup.note, "rows": rows,
            "profile_runs": profile_runs, "time_by_kind": by_kind}


PROFILED = ("FP32", "ORT static, real calib, reduce_range", "zeroquant W8A8")  # kernel time per layer kind


def _profile_markdown(model: dict) -> list[str]:
    """Kernel ms per layer kind for the PROFILED variants, with each quantized one's ratio to FP32."""
    variants = list(model["time_by_kind"])  # FP32 first
    lines = [f"Where the time goes (onnxruntime's profiler, median kernel ms per run over {model['profile_runs']} "
             "runs, layer count in brackets):", "",
             "| layer kind | FP32 ms | " + " | ".join(f"{v} ms | / FP32" for v in variants[1:]) + " |",
             "|---|--:|" + "--:|--:|" * (len(variants) - 1)]
    for label, ms in kind_rows(list(model["time_by_kind"].values())):
        cells = [label, _ms(ms[0])]
        for this in ms[1:]:
            cells += [_ms(this), f"{this / ms[0]:.2f}" if this is not None and ms[0] else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _ms(ms: float | None) -> str:
    return "–" if ms is None else f"{ms:.2f}"


def markdown(results: dict) -> str:
    lines = [
        "## W8A8: zeroquant against onnxruntime's quantizers", "",
        "Accuracy: top-1 on the zoo evaluation set; agreement = % of images whose top-1 class equals the FP32 "
        "model's. Size: the ONNX file. Latency: median of batch-1 onnxruntime CPU runs (threads as given per model), "
        "interleaved run by run across all variants of the model (idle workers do not spin), as a ratio to FP32 "
        "(below 1 is faster). Quantize time: wall time to build the file (image loading excluded; zeroquant includes "
        "distillation, ORT includes quant_pre_process and calibration).", "",
        "ORT static uses QDQ, per-channel int8 weights, uint8 activations, MinMax. On CPUs without VNNI onnxruntime's "
        "u8s8 kernels can saturate int16 intermediate sums with full-range int8 weights; the reduce_range row "
        "(7-bit weights) shows how much of ORT's accuracy loss comes from that. zeroquant's default "
        "(--target-cpu auto) uses the full int8 grid on CPUs with VNNI, AMX or ARM dot products and a 7-bit grid "
        "for non-depthwise layers elsewhere; the machine line says which this run's CPU is.", "",
    ]
    for name, model in results["models"].items():
        run = model["run"]
        lines += [f"### {name}{' (quick subset: not for quoting)' if run['quick'] else ''}", "",
                  *provenance_lines(run), "",
                  f"{run['threads']} onnxruntime threads; {model['eval_images']} evaluation images; ORT calibration: "
                  f"{model['noise_calib_images']} noise / "
                  f"{model['real_calib_images']} real images; latency over {model['latency_runs']} runs each. "
                  f"{model['note']}".rstrip(), "",
                  "| variant | top-1 % | agreement % | MB | size / FP32 | latency / FP32 | median ms | integer MACs "
                  "| quantize s |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in model["rows"]:
            quantize_s = "" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
            lines.append(f"| {r['variant']} | {r['top1']:.2f} | {r['agreement']:.2f} | {r['bytes'] / 1e6:.2f} | "
                         f"{r['size_ratio']:.2f} | {r['latency_ratio']:.2f} | {r['latency_ms']['median_ms']:.3f} | "
                         f"{100 * r['integer_mac_fraction']:.0f} % | {quantize_s} |")
        lines.append("")
        if "time_by_kind" in model:
            lines += _profile_markdown(model)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer calibration/evaluation images, shorter timing, zeroquant's distillation cache")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--workdir", type=Path, default=HERE.parent / "out" / "bench", help="where ONNX files go")
    parser.add_argument("--output", type=Path, default=HERE, help="folder for RESULTS.md and results.json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    args.latency_seconds = 5.0 if args.quick else 30.0
    saved = args.output / "results.json"
    # models not run this time keep their earlier entries (each carries its own date, versions and command)
    results = json.loads(saved.read_text()) if saved.exists() else {"models": {}}
    with progress_display() as progress:
        log = bench_log(progress)
        for name in names:
            run, start = provenance() | {"quick": args.quick, "threads": args.threads}, time.perf_counter()
            model = run_model(name, MODELS[name], args, progress, log)
            results["models"][name] = model | {"run": run | {"wall_s": round(time.perf_counter() - start, 1)}}
            args.output.mkdir(parents=True, exist_ok=True)  # written after every model: a long run keeps its part
            saved.write_text(json.dumps(results, indent=2) + "\n")
            write_section(args.output / "RESULTS.md", "w8a8", markdown(results))
    log(f"wrote {args.output / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
