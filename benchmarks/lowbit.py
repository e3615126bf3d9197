"""Low-bit and mixed-precision zeroquant models against FP32 on the zoo evaluation sets: ZeroQ vs Genie distillation,
min-max calibration only vs block reconstruction, W4A4 / W4A8 / mixed precision at an average-bits budget.

Writes the "lowbit" section of benchmarks/RESULTS.md and benchmarks/lowbit.json. Each model and distillation method
is distilled once from scratch (its time is its own column) and every variant of it calibrates on those images.
Besides accuracy it measures how often the exported ONNX model's top-1 equals the PyTorch fake-quant simulation's on
the evaluation images (what the export must preserve).

    python benchmarks/lowbit.py [--models resnet20_cifar10,...] [--effort default] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from zeroquant.evaluate.accuracy import evaluate_logits, onnx_session, predict_onnx
from zeroquant.evaluate.datasets import dataset_for_zoo
from zeroquant.export.onnx_export import to_onnx, write_atomic
from zeroquant.graph.capture import capture
from zeroquant.pipeline import QuantizeOptions, distill, export, prepare
from zeroquant.progress import progress_bar, stderr_console
from zeroquant.search import bits_for_budget
from zeroquant.search.pareto import parse_budget
from zeroquant.zoo.loading import load_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import provenance, provenance_lines, write_section  # noqa: E402  (a sibling script)


@dataclass(frozen=True)
class Variant:
    method: str = "zeroq"
    wbits: int = 4
    abits: int = 4
    reconstruct: bool = True
    budget: str | None = None  # average weight bits of a mixed-precision model (wbits is then ignored)

    @property
    def label(self) -> str:
        bits = f"mixed {self.budget} bits A{self.abits}" if self.budget else f"W{self.wbits}A{self.abits}"
        return f"{self.method} {bits} {'reconstructed' if self.reconstruct else 'calibration only'}"


def _grid(methods, bit_pairs, budget=None) -> list[Variant]:
    variants = [Variant(m, w, a, r) for m in methods for w, a in bit_pairs for r in (False, True)]
    return variants + ([Variant(budget=budget, abits=8)] if budget else [])


CIFAR = _grid(("zeroq", "genie"), ((4, 4), (4, 8)), budget="4.0")
MODELS = {
    "resnet20_cifar10": CIFAR,
    "resnet32_cifar10": CIFAR,
    "efficientnet_lite0": [Variant(wbits=4, abits=8, reconstruct=False), Variant(wbits=4, abits=8),
                           Variant(wbits=5, abits=8, reconstruct=False), Variant(budget="5.0", abits=8,
                                                                                 reconstruct=False)],
}


def simulate(sim, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([sim(torch.from_numpy(images[i : i + batch_size])).numpy()
                               for i in range(0, len(images), batch_size)])


def run_model(name: str, variants: list[Variant], args, progress, log) -> dict:
    folder = args.workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    loaded = load_model(f"zoo:{name}")
    shape = tuple(loaded.input_shape)
    data = dataset_for_zoo(name, args.limit)
    captured = capture(loaded.module, shape)
    fp32 = folder / "fp32.onnx"
    write_atomic(fp32, to_onnx(captured.graph_module, shape).SerializeToString())
    reference = predict_onnx(onnx_session(fp32), data.images)
    fp32_top1 = evaluate_logits(reference, data.labels)[0]
    base = QuantizeOptions(effort=args.effort, seed=args.seed)
    calibs, distill_s, rows = {}, {}, []
    for variant in variants:
        options = replace(base, method=variant.method, weight_bits=8 if variant.budget else variant.wbits,
                          activation_bits=variant.abits, reconstruct="on" if variant.reconstruct else "off")
        if variant.method not in calibs:
            log(f"{name}: distilling ({variant.method})")
            clock = time.perf_counter()
            calibs[variant.method], _ = distill(loaded, captured.graph_module, shape, options, progress)
            distill_s[variant.method] = round(time.perf_counter() - clock, 1)
        log(f"{name}: {variant.label}")
        clock, notes = time.perf_counter(), []
        if variant.budget:
            choice = bits_for_budget(loaded, shape, options, parse_budget(variant.budget), progress)
            options.layer_bits, notes = choice.layer_bits, [choice.note]
        prepared = prepare(loaded, shape, options, progress, calibs[variant.method])
        path = folder / (variant.label.replace(" ", "_").replace(".", "p") + ".onnx")
        report = export(prepared, loaded, path, options, shape, notes=notes)
        seconds = time.perf_counter() - clock
        logits = predict_onnx(onnx_session(path), data.images)
        sim_logits = simulate(prepared.sim, data.images)
        top1, _, agreement = evaluate_logits(logits, data.labels, reference)
        rows.append({**asdict(variant), "label": variant.label, "top1": round(top1, 2),
                     "delta": round(top1 - fp32_top1, 2), "agreement": round(agreement, 2),
                     "sim_top1": round(evaluate_logits(sim_logits, data.labels)[0], 2),
                     "onnx_vs_sim_agreement": round(evaluate_logits(logits, data.labels, sim_logits)[2], 2),
                     "average_weight_bits": _average_bits(prepared.sim), "quantize_s": round(seconds, 1),
                     "integer_mac_fraction": report.census["integer_mac_fraction"], "file": path.name})
        log(f"{name}: {variant.label}: top-1 {top1:.2f} (FP32 {fp32_top1:.2f}), {seconds:.0f} s")
    return {"eval_images": len(data.labels), "fp32_top1": round(fp32_top1, 2), "distill_s": distill_s, "rows": rows}


def _average_bits(sim) -> float:
    """Weight bits averaged over parameters (what --budget constrains)."""
    layers = sim.layers.values()
    return round(sum(layer.weight.numel() * layer.bits for layer in layers) / sum(l.weight.numel() for l in layers), 2)


def markdown(results: dict) -> str:
    lines = [f"## Low-bit and mixed precision (effort {results['effort']})", "", *provenance_lines(results), "",
             "Top-1 on the zoo evaluation set, Δ against FP32 in the same run; agreement = % of images whose top-1 "
             "equals FP32's; ONNX = sim: % of images where the exported ONNX model's top-1 equals the PyTorch "
             "fake-quant simulation's. Distill s: distillation from scratch, once per model and method (all its "
             "variants share the images); quantize s: everything after (sensitivity search, calibration, "
             "reconstruction, export, verification). First and last layers keep 8 bits (--keep-first-last 8); "
             "weights use the 7-bit grid reduce_range where the bits are 8.", ""]
    for name, model in results["models"].items():
        lines += [f"### {name}", "", f"{model['eval_images']} evaluation images, FP32 top-1 {model['fp32_top1']:.2f}; "
                  f"distillation: " + ", ".join(f"{m} {s:.0f} s" for m, s in model["distill_s"].items()), "",
                  "| distillation | bits | reconstruction | top-1 % | Δ FP32 | agreement % | ONNX = sim % "
                  "| integer MACs | quantize s |", "|---|---|---|--:|--:|--:|--:|--:|--:|"]
        for r in model["rows"]:
            bits = (f"mixed ({r['average_weight_bits']:.2f} avg), A{r['abits']}" if r["budget"]
                    else f"W{r['wbits']}A{r['abits']} ({r['average_weight_bits']:.2f} avg)")
            lines.append(f"| {r['method']} | {bits} | {'yes' if r['reconstruct'] else 'no'} | {r['top1']:.2f} | "
                         f"{r['delta']:+.2f} | {r['agreement']:.2f} | {r['onnx_vs_sim_agreement']:.2f} | "
                         f"{100 * r['integer_mac_fraction']:.0f} % | {r['quantize_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--effort", default="default", help="reconstruction effort: fast, default or thorough")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a class-balanced subset of N images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=HERE.parent / "out" / "lowbit", help="where ONNX files go")
    parser.add_argument("--output", type=Path, default=HERE, help="folder for RESULTS.md and lowbit.json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    cache = args.workdir / "cache"  # a fresh cache, so distillation is timed from scratch
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["ZEROQUANT_CACHE"] = str(cache)
    start = time.perf_counter()
    results = {**provenance(), "effort": args.effort, "models": {}}
    with progress_bar() as progress:
        log = (progress.console if progress else stderr_console()).log
        for name in names:
            results["models"][name] = run_model(name, MODELS[name], args, progress, log)
            results["wall_s"] = round(time.perf_counter() - start, 1)
            args.output.mkdir(parents=True, exist_ok=True)  # written after every model: a long run keeps its part
            (args.output / "lowbit.json").write_text(json.dumps(results, indent=2) + "\n")
            write_section(args.output / "RESULTS.md", "lowbit", markdown(results))
    log(f"wrote {args.output / 'RESULTS.md'} in {results['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
