"""Accuracy suites of zeroquant variants against FP32 on the zoo evaluation sets, each writing its own section of
benchmarks/RESULTS.md (and SUITE.json):

- lowbit: ZeroQ vs Genie distillation, min-max calibration only vs block reconstruction, W4A4 / W4A8, and mixed
  precision at an average-bits budget (issues 3 and 4);
- rounding: nearest vs GPTQ rounding, alone and as reconstruction's start, x distillation method (issue 13);
- ablation: the W8A8 default with one ingredient changed per row (calibration data, range method, bias correction,
  cross-layer equalization, weight grid, GPTQ or learned rounding), on ResNet-20 and EfficientNet-Lite0.

Each model and distillation method is distilled once from scratch (its time is reported on its own) and every variant
calibrates on those images. Besides accuracy it measures how often the exported ONNX model's top-1 equals the PyTorch
fake-quant simulation's on the evaluation images, which is what the export must preserve.

    python benchmarks/accuracy.py lowbit|rounding|ablation [--models resnet20_cifar10,...] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from zeroquant.cli.output import progress_display
from zeroquant.errors import VerificationError
from zeroquant.evaluate.accuracy import evaluate_logits
from zeroquant.evaluate.datasets import dataset_for_zoo
from zeroquant.export.onnx_export import to_onnx
from zeroquant.files import write_atomic
from zeroquant.options import QuantizeOptions
from zeroquant.pipeline import distill_set, export, prepare, start
from zeroquant.runtime import predict, session

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import bench_log, provenance, provenance_lines, write_section  # noqa: E402  (a sibling script)


@dataclass(frozen=True)
class Variant:
    label: str
    options: tuple = ()  # (QuantizeOptions field, value) pairs over the suite's defaults
    budget: str | None = None  # average weight bits: mixed precision chosen by `quantize --budget`

    def quantize_options(self, base: QuantizeOptions) -> QuantizeOptions:
        return replace(base, **dict(self.options), budget=self.budget)


def _lowbit(effort: str) -> list[Variant]:
    """ZeroQ vs Genie x calibration only vs reconstruction x W4A4 / W4A8, and mixed precision at 4.0 bits (A8)."""
    variants = [Variant(f"{method} W{w}A{a} {'reconstructed' if recon else 'calibration only'}",
                        (("method", method), ("wbits", w), ("abits", a),
                         ("reconstruct", "on" if recon else "off"), ("effort", effort)))
                for method in ("zeroq", "genie") for w, a in ((4, 4), (4, 8)) for recon in (False, True)]
    return variants + [Variant("zeroq mixed 4.0 bits A8 reconstructed", (("reconstruct", "on"), ("effort", effort)),
                               budget="4.0")]


def _ablation(extra: tuple[Variant, ...] = ()) -> list[Variant]:
    """The W8A8 defaults with ZeroQ images (the suites' base), then one ingredient changed per row."""
    return [Variant("base (zeroq, mse ranges, bias correction auto, rounding auto, --target-cpu auto)"),
            Variant("calibration: inversion (the default since 0.2.0)", (("method", "inversion"),)),
            Variant("calibration: Gaussian noise", (("method", "noise"),)),
            Variant("calibration: genie", (("method", "genie"),)),
            *(Variant(f"ranges: {m}", (("ranges", m),)) for m in ("minmax", "percentile", "analytic", "auto")),
            Variant("bias correction on", (("bias_correction", "on"),)),
            Variant("bias correction off", (("bias_correction", "off"),)),
            Variant("bias correction analytic (BN statistics)", (("bias_correction", "analytic"),)),
            Variant("cross-layer equalization on", (("equalize", True),)),
            Variant("weight grid: --target-cpu portable (7-bit, safe without VNNI)", (("target_cpu", "portable"),)),
            Variant("weight grid: --target-cpu int32-dot (full int8)", (("target_cpu", "int32-dot"),)),
            Variant("rounding: gptq at 8 bits too", (("rounding", "gptq"),)),
            *extra]


def _rounding_r20() -> list[Variant]:
    """Nearest vs second-order rounding, each alone and (ZeroQ images) as the start of block reconstruction
    (AdaRound-style learned rounding), with ZeroQ and Genie images; then W4A8 and mixed 4.0 bits with GPTQ."""
    return [*(Variant(f"{method} W4A4 {rounding}{' + reconstruction' if recon else ', calibration only'}",
                      (("method", method), ("wbits", 4), ("abits", 4), ("rounding", rounding),
                       ("reconstruct", "on" if recon else "off")))
              for method, recon in (("zeroq", False), ("genie", False), ("zeroq", True))
              for rounding in ("nearest", "gptq")),
            Variant("zeroq W4A8 gptq, calibration only", (("wbits", 4), ("rounding", "gptq"), ("reconstruct", "off"))),
            Variant("zeroq mixed 4.0 bits A8 gptq, calibration only", (("reconstruct", "off"),), budget="4.0")]


SUITES = {
    "lowbit": {
        "resnet20_cifar10": _lowbit("default"),
        "resnet32_cifar10": _lowbit("fast"),
        "efficientnet_lite0": [
            Variant("zeroq W4A8 (depthwise at 4 bits) calibration only",
                    (("wbits", 4), ("reconstruct", "off"), ("keep_depthwise", 0))),
            Variant("zeroq W4A8 (depthwise at 4 bits) reconstructed (fast)",
                    (("wbits", 4), ("reconstruct", "on"), ("effort", "fast"), ("keep_depthwise", 0))),
            Variant("zeroq W4A8 calibration only", (("wbits", 4), ("reconstruct", "off"))),
            Variant("zeroq W4A8 reconstructed (fast)", (("wbits", 4), ("reconstruct", "on"), ("effort", "fast"))),
            Variant("zeroq mixed 5.0 bits A8 calibration only", (("reconstruct", "off"),), budget="5.0"),
            Variant("zeroq mixed 5.0 bits A8 reconstructed (fast)", (("reconstruct", "on"), ("effort", "fast")),
                    budget="5.0")],
    },
    "rounding": {
        "resnet20_cifar10": _rounding_r20(),
        "efficientnet_lite0": [
            Variant("zeroq W4A8 nearest, calibration only", (("wbits", 4), ("rounding", "nearest"),
                                                             ("reconstruct", "off"))),
            Variant("zeroq W4A8 gptq, calibration only", (("wbits", 4), ("rounding", "gptq"), ("reconstruct", "off"))),
            Variant("zeroq mixed 5.0 bits A8 gptq, calibration only", (("reconstruct", "off"),), budget="5.0"),
            Variant("zeroq mixed 4.0 bits A8 gptq, calibration only", (("reconstruct", "off"),), budget="4.0")],
    },
    "ablation": {
        "resnet20_cifar10": _ablation((Variant("learned rounding at 8 bits (reconstruct on)",
                                               (("reconstruct", "on"),)),)),
        "efficientnet_lite0": _ablation(),
    },
}


def simulate(sim, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([sim(torch.from_numpy(images[i : i + batch_size])).numpy()
                               for i in range(0, len(images), batch_size)])


def run_model(name: str, variants: list[Variant], args, progress, log) -> dict:
    folder = args.workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    job = start(f"zoo:{name}", None, QuantizeOptions(seed=args.seed), {}, progress=progress)
    data = dataset_for_zoo(name, args.limit)
    fp32 = folder / "fp32.onnx"
    write_atomic(fp32, to_onnx(job.graph_module, job.shape, job.captured.output_names).SerializeToString())
    reference = predict(session(fp32), data.images)
    fp32_top1 = evaluate_logits(reference, data.labels)[0]
    calibs, distill_s, rows = {}, {}, []
    for variant in variants:
        job.options = variant.quantize_options(suite_base(args.seed))
        method = job.options.method
        if method not in calibs:
            log(f"{name}: distilling ({method})")
            clock = time.perf_counter()
            calibs[method], _ = distill_set(job)
            distill_s[method] = round(time.perf_counter() - clock, 1)
        log(f"{name}: {variant.label}")
        clock = time.perf_counter()
        prepared = prepare(job, calibs[method])
        path = folder / (re.sub(r"\W+", "_", variant.label).strip("_").lower() + ".onnx")
        try:
            result = export(job, prepared, path, with_float=False)
        except VerificationError as exc:  # zeroquant refuses to write it: that is the row's result
            rows.append({"label": variant.label, "options": dict(variant.options), "budget": variant.budget,
                         "refused": str(exc), "quantize_s": round(time.perf_counter() - clock, 1)})
            log(f"{name}: {variant.label}: refused ({exc})")
            continue
        write_atomic(path, result.onnx)
        seconds = time.perf_counter() - clock
        logits = predict(session(path), data.images)
        sim_logits = simulate(prepared.sim, data.images) if args.suite in SIM_CHECKED else None
        top1, _, agreement = evaluate_logits(logits, data.labels, reference)
        rows.append({"label": variant.label, "options": dict(variant.options), "budget": variant.budget,
                     "top1": round(top1, 2),
                     "delta": round(top1 - fp32_top1, 2), "agreement": round(agreement, 2),
                     "onnx_vs_sim_agreement": None if sim_logits is None else round(
                         evaluate_logits(logits, data.labels, sim_logits)[2], 2),
                     "average_weight_bits": _average_bits(prepared.sim), "quantize_s": round(seconds, 1),
                     "integer_mac_fraction": result.report.census["integer_mac_fraction"], "file": path.name})
        log(f"{name}: {variant.label}: top-1 {top1:.2f} (FP32 {fp32_top1:.2f}), {seconds:.0f} s")
    return {"eval_images": len(data.labels), "fp32_top1": round(fp32_top1, 2), "distill_s": distill_s, "rows": rows}


def _average_bits(sim) -> float:
    """Weight bits averaged over parameters (what --budget constrains)."""
    layers = sim.layers.values()
    return round(sum(layer.weight.numel() * layer.bits for layer in layers) / sum(l.weight.numel() for l in layers), 2)


def suite_base(seed: int) -> QuantizeOptions:
    """The suites' base: ZeroQ images, the default when their rows were measured (rows name another method)."""
    return QuantizeOptions(seed=seed, method="zeroq")


SIM_CHECKED = {"lowbit", "rounding"}  # suites that also run the simulation on the evaluation set (about 1 min per Lite0 row)


def _or_dash(value) -> str:
    return "–" if value is None else f"{value:.2f}"


TITLES = {"lowbit": "Low-bit and mixed precision: ZeroQ vs Genie, calibration only vs reconstruction",
          "rounding": "Rounding: nearest vs second-order (GPTQ), alone and before reconstruction",
          "ablation": "Ablation: each W8A8 ingredient changed alone"}


def markdown(results: dict) -> str:
    lines = [f"## {TITLES[results['suite']]}", "",
             "Top-1 on the zoo evaluation set, Δ against FP32 in the same run; agreement = % of images whose top-1 "
             "equals FP32's; ONNX = sim: % of images where the exported ONNX model's top-1 equals the PyTorch "
             "fake-quant simulation's. Average bits: weight bits averaged over parameters (first and last layers keep "
             "8 bits, --keep-first-last 8; depthwise convs keep 8 bits under a uniform --wbits, --keep-depthwise 8, "
             "unless a row says otherwise). Distillation runs from scratch once per model and method (its time is "
             "given above each table); quantize s is everything after it (sensitivity search, calibration, bias "
             "correction, reconstruction, export, verification).", ""]
    for name, model in results["models"].items():
        lines += [f"### {name}", "", *provenance_lines(model["run"]), "",
                  f"{model['eval_images']} evaluation images, FP32 top-1 {model['fp32_top1']:.2f}; "
                  f"distillation: " + ", ".join(f"{m} {s:.0f} s" for m, s in model["distill_s"].items()), "",
                  "| variant | avg bits | top-1 % | Δ FP32 | agreement % | ONNX = sim % | integer MACs | quantize s |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|"]
        for r in model["rows"]:
            if "refused" in r:
                lines.append(f"| {r['label']} | | refused: {r['refused']} | | | | | {r['quantize_s']:.0f} |")
                continue
            rerun = " †" if "rerun" in r else ""
            lines.append(f"| {r['label']}{rerun} | {r['average_weight_bits']:.2f} | {r['top1']:.2f} | "
                         f"{r['delta']:+.2f} | {r['agreement']:.2f} | {_or_dash(r['onnx_vs_sim_agreement'])} | "
                         f"{100 * r['integer_mac_fraction']:.0f} % | {r['quantize_s']:.0f} |")
        lines.append("")
        lines += [f"† re-run {r['rerun']['date']} at zeroquant {r['rerun']['zeroquant']}: `{r['rerun']['command']}`"
                  for r in model["rows"] if "rerun" in r]
        lines.append("")
    return "\n".join(lines)


def _merge(old: dict, new: dict, rerun: dict, variants: list[Variant]) -> dict:
    """The old model entry with the re-run rows put in place of the rows of the same label, in the suite's order."""
    fresh = {row["label"]: {**row, "rerun": {"date": rerun["date"], "zeroquant": rerun["versions"]["zeroquant"],
                                             "command": rerun["command"]}} for row in new["rows"]}
    rows = [fresh.pop(row["label"], row) for row in old["rows"]] + list(fresh.values())
    order = {v.label: i for i, v in enumerate(variants)}
    return {**old, "rows": sorted(rows, key=lambda row: order.get(row["label"], len(order)))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=SUITES, help="which table: " + ", ".join(SUITES))
    parser.add_argument("--models", help="comma-separated subset of the suite's models")
    parser.add_argument("--only", help="re-run only the variants whose label contains this text; their rows replace "
                                       "those of the same label in the existing SUITE.json, marked as re-run")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a class-balanced subset of N images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=HERE.parent / "out" / "accuracy", help="where ONNX files go")
    parser.add_argument("--output", type=Path, default=HERE, help="folder for RESULTS.md and SUITE.json")
    args = parser.parse_args(argv)
    models = SUITES[args.suite]
    names = [n.strip() for n in (args.models or ",".join(models)).split(",") if n.strip()]
    unknown = [n for n in names if n not in models]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; the {args.suite} suite has {', '.join(models)}")
    args.workdir = args.workdir / args.suite
    cache = args.workdir / "cache"  # a fresh cache, so distillation is timed from scratch (a re-run reuses it)
    if not args.only:
        shutil.rmtree(cache, ignore_errors=True)
    os.environ["ZEROQUANT_CACHE"] = str(cache)
    saved = args.output / f"{args.suite}.json"
    # models not run this time keep their earlier entries (each carries its own date, versions and command)
    results = json.loads(saved.read_text()) if saved.exists() else {"suite": args.suite, "models": {}}
    with progress_display() as progress:
        log = bench_log(progress)
        for name in names:
            run, start = provenance(), time.perf_counter()
            variants = [v for v in models[name] if not args.only or args.only in v.label]
            model = run_model(name, variants, args, progress, log)
            if args.only:
                model = _merge(results["models"][name], model, run, models[name])
            else:
                model["run"] = {**run, "wall_s": round(time.perf_counter() - start, 1)}
            results["models"][name] = model
            args.output.mkdir(parents=True, exist_ok=True)  # written after every model: a long run keeps its part
            saved.write_text(json.dumps(results, indent=2) + "\n")
            write_section(args.output / "RESULTS.md", args.suite, markdown(results))
    log(f"wrote {args.output / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
