"""How good are calibration images? One fixed quantizer, changing only the images it calibrates on.

The ruler: W4A8 for EfficientNet-Lite0, W4A4 for the CIFAR ResNets; depthwise, first and last layers at 8 bits
(the defaults), GPTQ rounding, calibration only (no reconstruction), default bias correction (part of the ruler
in the tables: it changed from measured to analytic), GPTQ's float target (`--target-ridge none` rounds towards
each layer's own output instead, as GPTQ did before it; the tables name the ridge), seed 0. Each source gives N images:

- real: photos (the upper bound). Lite0: the even-indexed half of ../shared's 500 ImageNet photos (cycled with
  horizontal flips beyond 250); the CIFAR ResNets: ../shared's CIFAR-10 training images.
- noise: Gaussian noise (the lower bound).
- zeroquant distillers: `zeroq`, `genie`, `inversion`, with settings over the defaults as `inversion:coarse=0,
  iterations=80` (iterations and lr are DistillSettings; the rest the distiller's own fields).
- mct: Sony MCT's data generation (model-compression-toolkit, a peer: benchmarks/mct_images.py runs it in its own
  process); `mct:iterations=K`. Give its folder with --mct-path where it is not installed in this environment.

Scores on images no source saw and the defaults were not tuned on: for Lite0 the odd-indexed 250 photos, for the
ResNets the CIFAR-10 test images. Columns: top-1 and its drop against FP32, top-1 agreement with FP32, mean KL from
FP32's outputs, the seconds the source took to make its images and images per second. Each run adds or replaces its
rows in benchmarks/data_quality.json and rewrites the data_quality section of RESULTS.md from all rows.

    python benchmarks/data_quality.py --model efficientnet_lite0 --images 32 --sources real,noise,zeroq,inversion
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zeroquant import calib as calibration_sets
from zeroquant.calib.calibset import CalibSet, DistillSettings
from zeroquant.evaluate.accuracy import evaluate_logits
from zeroquant.evaluate.datasets import ImageSet, dataset_for_zoo, load_image_folder
from zeroquant.options import QuantizeOptions
from zeroquant.pipeline import pixel_range, prepare, start
from zeroquant.quant import gptq
from zeroquant.zoo.registry import zoo_entry

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import machine_text, provenance, write_section  # noqa: E402  (a sibling script)

JSON = HERE / "data_quality.json"
RULER = {"efficientnet_lite0": (4, 8), "resnet20_cifar10": (4, 4), "resnet32_cifar10": (4, 4)}
SETTINGS = {f.name for f in dataclasses.fields(DistillSettings)}


def splits(model: str) -> tuple[ImageSet, ImageSet]:
    """(real calibration photos, scoring photos), disjoint."""
    entry = zoo_entry(model)
    data = dataset_for_zoo(model)
    calib_folder = entry.resolve(entry.dataset["path"]).parent / "calib"
    if calib_folder.is_dir():
        return load_image_folder(calib_folder, entry.preprocessing), data

    def part(start: int) -> ImageSet:
        return ImageSet(data.images[start::2], data.labels[start::2], data.paths[start::2])

    return part(0), part(1)


def real_images(pool: ImageSet, count: int, seed: int) -> torch.Tensor:
    order = np.random.default_rng(seed).permutation(len(pool.images))
    picked = [pool.images[order[i % len(order)]] for i in range(count)]
    flipped = [image[..., ::-1] if (i // len(order)) % 2 else image for i, image in enumerate(picked)]
    return torch.from_numpy(np.ascontiguousarray(np.stack(flipped)))


def split_sources(text: str) -> list[str]:
    """'real,inversion:iterations=80,coarse=0,zeroq' -> ['real', 'inversion:iterations=80,coarse=0', 'zeroq']: a
    key=value item belongs to the source before it."""
    sources: list[str] = []
    for item in filter(None, text.split(",")):
        if "=" in item and ":" not in item and sources:
            sources[-1] += "," + item
        else:
            sources.append(item)
    return sources


def parse_source(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    knobs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        knobs[key] = json.loads(value) if value not in ("true", "false") else value == "true"
    return name, knobs


def make_images(job, source: str, count: int, pool: ImageSet, args) -> tuple[torch.Tensor, float, float]:
    """(images, seconds, final BN loss or NaN) of one source."""
    name, knobs = parse_source(source)
    clock = time.perf_counter()
    if name == "real":
        return real_images(pool, count, args.seed), 0.0, float("nan")
    if name == "noise":
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randn(count, *job.shape, generator=generator), 0.0, float("nan")
    if name == "mct":
        return mct_images(job, count, knobs, args)
    settings = DistillSettings(count, args.batch_size, calibration_sets.default_iterations(job.shape), 0.2,
                               args.seed, pixel_range(job))
    settings = dataclasses.replace(settings, **{k: v for k, v in knobs.items() if k in SETTINGS})
    distiller = calibration_sets.DISTILLERS[name]
    own = {k: v for k, v in knobs.items() if k not in SETTINGS}
    if own:
        distiller = dataclasses.replace(distiller, **own)
    calib, _ = calibration_sets.distill(job.graph_module, job.shape, distiller, settings, torch.device("cpu"),
                                        job.captured.digest, use_cache=False)
    return calib.images, time.perf_counter() - clock, calib.final_loss


def mct_images(job, count: int, knobs: dict, args) -> tuple[torch.Tensor, float, float]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "mct.pt"
        env = dict(os.environ)
        if args.mct_path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), args.mct_path]))
        command = [sys.executable, str(HERE / "mct_images.py"), args.model, str(count), str(out),
                   "--iterations", str(knobs.get("iterations", 500)), "--seed", str(args.seed),
                   "--batch-size", str(args.batch_size)]
        subprocess.run(command, env=env, check=True)
        calib = CalibSet.from_file(out)
        return calib.images, float(calib.settings["seconds"]), float("nan")


def logits_of(module, images: np.ndarray, batch: int = 125) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(torch.from_numpy(images[i:i + batch])) for i in range(0, len(images), batch)])


def fidelity(logits: torch.Tensor, reference: torch.Tensor, labels) -> dict:
    """Top-1, top-1 agreement with the float model and mean KL from its outputs."""
    top1, _, agreement = evaluate_logits(logits.numpy(), labels, reference.numpy())
    kl = F.kl_div(F.log_softmax(logits.double(), 1), F.log_softmax(reference.double(), 1), log_target=True,
                  reduction="batchmean")
    return {"top1": round(top1, 2), "agreement": round(agreement, 2), "kl": round(float(kl), 4)}


def score(job, images: torch.Tensor, test: ImageSet, reference: torch.Tensor) -> dict:
    prepared = prepare(job, images)
    return {**fidelity(logits_of(prepared.sim, test.images), reference, test.labels),
            "bias_correction": bias_correction(job.options, prepared.sim)}


def bias_correction(options: QuantizeOptions, sim) -> str:
    """Part of the ruler: whether the quantizer corrected biases, from the images or the BN statistics."""
    source = options.bias_correction_source(any(layer.is_depthwise for layer in sim.layers.values()))
    return {None: "none", "images": "measured", "statistics": "analytic"}[source]


def run(args) -> None:
    wbits, abits = RULER[args.model]
    gptq.TARGET_RIDGE = args.target_ridge
    options = QuantizeOptions(wbits=wbits, abits=abits, rounding="gptq", reconstruct="off", seed=args.seed,
                              cache=False)
    job = start(f"zoo:{args.model}", None, options, {})
    pool, test = splits(args.model)
    reference = logits_of(job.graph_module, test.images)
    fp32 = evaluate_logits(reference.numpy(), test.labels)[0]
    for source in split_sources(args.sources):
        for count in args.images:
            images, seconds, bn_loss = make_images(job, source, count, pool, args)
            scored = score(job, images, test, reference)
            ruler = f"W{wbits}A{abits}, bias correction {scored.pop('bias_correction')}"
            if args.target_ridge is not None:
                ruler += f", GPTQ float target (ridge {args.target_ridge:g})"
            row = {"model": args.model, "images": count, "source": source, "fp32_top1": round(fp32, 2),
                   "drop": round(fp32 - scored["top1"], 2), **scored, "seconds": round(seconds, 1),
                   "images_per_s": round(count / seconds, 3) if seconds else None,
                   "bn_loss": None if bn_loss != bn_loss else round(bn_loss, 2), "ruler": ruler,
                   "eval_images": len(test.labels), "seed": args.seed, **provenance()}
            rows = json.loads(JSON.read_text()) if JSON.exists() else {}  # read again: runs of other sources beside
            rows[f"{args.model}|{count}|{source}" + (f"|seed {args.seed}" if args.seed else "") + f"|{ruler}"] = row
            JSON.write_text(json.dumps(rows, indent=1, sort_keys=True))
            print(json.dumps({k: row[k] for k in ("model", "images", "source", "top1", "drop", "agreement", "kl",
                                                  "seconds")}), flush=True)
    write_section(HERE / "RESULTS.md", "data_quality", markdown(rows))


def run_of(row: dict) -> tuple[str, str, str]:
    """What tells two runs apart: the code, the command and the machine (rows of one table can come from CPUs whose
    float kernels round differently, which moves a low-bit model's top-1 by points)."""
    return row["versions"]["zeroquant"], row["command"], machine_text(row["machine"])


def markdown(rows: dict) -> str:
    lines = ["## Calibration data quality: one quantizer, only the images change", "",
             "The ruler: GPTQ rounding, calibration only; depthwise, first and last layers at 8 bits. Scored "
             "on photos no source saw (Lite0: the odd-indexed 250 of the 500 ImageNet samples, real calibration "
             "photos come from the even-indexed half; ResNets: CIFAR-10 test images, real ones from the training "
             "images). Gap: the drop minus the drop with the same number of real photos. Seconds: making the "
             "images on this machine (distillation; MCT's generation in its own process); comparable within a run "
             "(some screening runs shared the two cores with another job). tv_absolute: rows measured while the "
             "inversion's tv was a fixed weight (their commands say tv=); it is now relative to the matching "
             "gradient. The seed picks the real "
             "photos, the distillation's start and the quantizer's; run: which command measured the row (below each "
             "table).", ""]
    by_model: dict = {}
    for row in rows.values():
        by_model.setdefault((row["model"], row["ruler"], row["images"], row.get("seed", 0)), []).append(row)
    for (model, _, count, seed), group in sorted(by_model.items()):
        real = next((r for r in group if r["source"] == "real"), None)
        first = group[0]
        runs = list(dict.fromkeys(run_of(r) for r in sorted(group, key=lambda r: r["date"])))  # in order of first row
        lines += [f"### {model}, {first['ruler']}, {count} images, seed {seed} (FP32 top-1 {first['fp32_top1']:.2f} "
                  f"on {first['eval_images']} images)", "",
                  "| source | top-1 | drop | gap to real | agreement % | KL | seconds | images/s | run |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in sorted(group, key=lambda r: r["drop"]):
            gap = f"{r['drop'] - real['drop']:+.2f}" if real else "–"
            rate = f"{r['images_per_s']:.3f}" if r["images_per_s"] else "–"
            lines.append(f"| {r['source']} | {r['top1']:.2f} | {r['drop']:.2f} | {gap} | {r['agreement']:.1f} | "
                         f"{r['kl']:.3f} | {r['seconds']:.0f} | {rate} | "
                         f"{runs.index(run_of(r)) + 1} |")
        v = max(group, key=lambda r: r["date"])["versions"]
        lines += ["", f"- versions: torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}",
                  *(f"- run {i}: zeroquant {version} on {cpu}: `{command}`"
                    for i, (version, command, cpu) in enumerate(runs, 1)),
                  f"- dates: {min(r['date'] for r in group)[:16]} to {max(r['date'] for r in group)[:16]}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0", choices=sorted(RULER))
    parser.add_argument("--images", type=lambda s: [int(v) for v in s.split(",")], default=[32])
    parser.add_argument("--sources", default="real,noise,zeroq,inversion")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mct-path", help="a folder to import model_compression_toolkit from")
    parser.add_argument("--target-ridge", type=lambda s: None if s == "none" else float(s), default=gptq.TARGET_RIDGE,
                        help="GPTQ's float-target ridge (quant/gptq.py TARGET_RIDGE); none: plain GPTQ")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
