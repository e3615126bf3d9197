"""Coverage: one model of every torchvision family with BatchNorm, plus two segmentation models, one of every timm
family with BatchNorm (CNN-attention hybrids included; timm:NAME) and ultralytics YOLO11n from its YAML, through
zeroquant (random weights, BN statistics populated by training-mode passes over noise: this checks the graph path
and the speed, not accuracy). For each: does it quantize, the share of conv/linear MACs in integer kernels, the
float ops left in onnxruntime's optimised graph, batch-1 latency against the FP32 export and onnxruntime's own
quantize_static of it (QDQ, per-channel, calibrated on noise), all timed interleaved in one run, quantize time and
ONNX-vs-simulation parity. Writes the coverage section of benchmarks/RESULTS.md and coverage.json; with --models,
the named rows are replaced and the others kept, each row naming the run (machine, load, versions, command) that
measured it.

    python benchmarks/coverage.py [--models resnet18,timm:levit_128s,...] [--threads 2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import zeroquant
from zeroquant.errors import first_line
from zeroquant.evaluate.datasets import load_image_folder
from zeroquant.runtime import session
from zeroquant.zoo.registry import Preprocessing
from zeroquant.cli.output import progress_display
from zeroquant.evaluate.latency import kind_rows, measure, time_by_kind

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ort_baselines import ort_static  # noqa: E402  (sibling scripts, not a package)
from results_file import bench_log, provenance, provenance_lines, write_section  # noqa: E402

CLASSIFIERS = {  # family: (torchvision name, input size)
    "resnet": ("resnet18", 224), "resnext": ("resnext50_32x4d", 224), "wide_resnet": ("wide_resnet50_2", 224),
    "mobilenet_v2": ("mobilenet_v2", 224), "mobilenet_v3": ("mobilenet_v3_small", 224),
    "mobilenet_v3 (large)": ("mobilenet_v3_large", 224), "efficientnet": ("efficientnet_b0", 224),
    "efficientnet_v2": ("efficientnet_v2_s", 224), "regnet": ("regnet_y_400mf", 224), "mnasnet": ("mnasnet0_5", 224),
    "shufflenet": ("shufflenet_v2_x0_5", 224), "densenet": ("densenet121", 224), "googlenet": ("googlenet", 224),
    "inception_v3": ("inception_v3", 299),
}
SEGMENTATION = {"lraspp": ("lraspp_mobilenet_v3_large", 224), "deeplabv3": ("deeplabv3_mobilenet_v3_large", 224)}
# one model of every timm family that has BatchNorm (hybrids with attention included), the smallest of each; and
# nf_resnet26 (weight standardisation, no BN: it must get the no-BatchNorm hint)
TIMM = {f"timm {family}": (f"timm:{name}", 256 if name.endswith("_256") else 224) for family, name in {
    "resnet": "resnet18", "resnetv2": "resnetv2_50", "regnet": "regnetx_002", "regnety": "regnety_002",
    "efficientnet": "efficientnet_b0", "mobilenetv3": "mobilenetv3_small_100", "mobilenetv4": "mobilenetv4_conv_small",
    "mnasnet": "mnasnet_100", "fbnet": "fbnetv3_b", "tinynet": "tinynet_e", "lcnet": "lcnet_050",
    "ghostnet": "ghostnet_100", "hardcorenas": "hardcorenas_a", "mixnet": "mixnet_s", "rexnet": "rexnet_100",
    "densenet": "densenet121", "dla": "dla34", "dpn": "dpn48b", "hrnet": "hrnet_w18_small", "cspnet": "cspresnet50",
    "darknet": "cspdarknet53", "vovnet": "ese_vovnet19b_dw", "selecsls": "selecsls42b", "res2net": "res2net50_26w_4s",
    "resnest": "resnest14d", "sknet": "skresnet18", "repvgg": "repvgg_a0", "byobnet": "gernet_s",
    "byoanet (attention)": "botnet26t_256", "gcresnet (attention)": "gcresnet33ts", "inception_v3": "inception_v3",
    "xception": "legacy_xception", "senet": "legacy_seresnet18", "vgg": "vgg11_bn", "repghost": "repghostnet_050",
    "mobileone": "mobileone_s0", "ghostnetv2": "ghostnetv2_100", "hgnet": "hgnetv2_b0", "starnet": "starnet_s1",
    "efficientvit (attention)": "efficientvit_b0", "levit (attention)": "levit_128s",
    "mobilevit (attention)": "mobilevit_xxs", "fastvit (attention)": "fastvit_t8", "repvit": "repvit_m0_9",
    "efficientformer (attention)": "efficientformer_l1", "efficientformerv2 (attention)": "efficientformerv2_s0",
    "tiny_vit (attention)": "tiny_vit_5m_224", "nextvit (attention)": "nextvit_small",
    "inception_next": "inception_next_tiny", "nfnet (no BN)": "nf_resnet26"}.items()}
DETECTION = {"ultralytics yolo11": ("yolo:yolo11n.yaml", 640)}
PHOTOS = HERE.parent.parent / "shared" / "data" / "imagenet-samples" / "images"  # detection fidelity on real photos
PROFILED = ("mobilenet_v3_small", "efficientnet_b0")  # kernel time per layer kind, FP32 vs ORT vs zeroquant
# random weights: distillation only has to exercise the path, so it is short (the defaults are in the README)
DISTILL = dict(images=16, batch_size=16, iterations=10)


class _Detector(torch.nn.Module):
    """An ultralytics detection model returning only its decoded boxes and scores ([batch, 4 + classes, anchors])."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def _extra_model(name: str) -> torch.nn.Module:
    """timm:NAME or yolo:CONFIG.yaml, random weights (nothing is downloaded)."""
    source, _, spec = name.partition(":")
    if source == "timm":
        import timm

        return timm.create_model(spec, pretrained=False)
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(spec, verbose=False)
    head = model.model[-1]
    head.export, head.dynamic = True, True  # ultralytics' export mode: one tensor out, anchors for any batch
    return _Detector(model)


def build(name: str, size: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    if ":" in name:
        model = _extra_model(name)
    elif name in {n for n, _ in SEGMENTATION.values()}:
        extra = {"aux_loss": False} if name.startswith("deeplab") else {}
        model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=21,
                                                               **extra)
    else:
        extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        model = getattr(torchvision.models, name)(weights=None, **extra)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def run_model(family: str, name: str, size: int, args, progress, log) -> dict:
    folder = args.workdir / name.replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"FP32": folder / "fp32.onnx", "ORT quantize_static": folder / "ort.onnx", "zeroquant": folder / "zq.onnx"}
    row = {"family": family, "model": name, "input": size}
    log(f"{name}: quantizing")
    model = build(name, size)  # outside the try: a model that fails on its own input is the benchmark's error
    clock = time.perf_counter()
    try:
        result = zeroquant.quantize(model, paths["zeroquant"], input_shape=(3, size, size),
                                    float_output=paths["FP32"], progress=progress, cache=False, **DISTILL,
                                    **({"parity_tolerance": args.parity_tolerance} if args.parity_tolerance else {}))
    except zeroquant.ZeroQuantError as exc:
        return row | {"ok": False, "error": str(exc)}
    except Exception as exc:  # a bug in zeroquant: the row says so and the run goes on to the next model
        return row | {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
    report = result.report
    row |= {"ok": True, "quantize_s": round(time.perf_counter() - clock, 1),
            "integer_mac_fraction": report.census["integer_mac_fraction"], "float_ops": report.census["float_ops"],
            "output_float_ops": report.census["output_float_ops"], "parity": report.parity,
            "outputs": report.outputs}
    log(f"{name}: onnxruntime quantize_static")
    noise = np.random.default_rng(0).standard_normal((16, 3, size, size), dtype=np.float32)
    try:
        row["ort_quantize_s"] = round(ort_static(paths["FP32"], paths["ORT quantize_static"], noise), 1)
    except Exception as exc:  # onnxruntime's quantizer fails on this model: zeroquant is timed against FP32 alone
        row["ort_error"] = f"{type(exc).__name__}: {first_line(exc, 160)}"
        del paths["ORT quantize_static"]
    log(f"{name}: latency, interleaved")
    order = list(paths)
    latency = dict(zip(order, measure([paths[v] for v in order], 1, args.threads, seconds=args.seconds)))
    row["latency_ms"] = {v: round(latency[v].median_ms, 3) for v in order}
    row["latency_vs_fp32"] = latency["zeroquant"].median_ms / latency["FP32"].median_ms
    if "ORT quantize_static" in latency:
        row["latency_vs_ort"] = latency["zeroquant"].median_ms / latency["ORT quantize_static"].median_ms
        row["ort_vs_fp32"] = latency["ORT quantize_static"].median_ms / latency["FP32"].median_ms
    if name in {n for n, _ in DETECTION.values()}:
        log(f"{name}: boxes and scores on real photos")
        row["detection"] = detection_fidelity(paths, size)
    if name in PROFILED:
        log(f"{name}: kernel profile")
        row["time_by_kind"] = {v: [k.to_dict() for k in time_by_kind(paths[v], 1, args.threads, 100)] for v in order}
    return row


def detection_fidelity(paths: dict, size: int, photos: int = 16) -> dict:
    """Boxes and scores of each quantized file against the FP32 one on real photos (resized to size x size, pixels
    in [0, 1] as ultralytics feeds them), from the decoded head [batch, 4 + classes, anchors]: box error in pixels
    over every anchor (median, 95th percentile, max) and the class-score error over each image's score spread
    (mean and max over images), since random weights give near-flat scores whose absolute error says little."""
    prep = Preprocessing("yolo", resize=size, crop=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images = load_image_folder(PHOTOS, prep, labels=None, limit=photos).images
    outputs = {}
    for variant, path in paths.items():
        model = session(path)
        name = model.get_inputs()[0].name
        outputs[variant] = np.concatenate([model.run(None, {name: image[None]})[0] for image in images])
    reference = outputs["FP32"]
    spread = reference[:, 4:].max((1, 2)) - reference[:, 4:].min((1, 2))
    fidelity = {"photos": len(images)}
    for variant, out in outputs.items():
        if variant == "FP32":
            continue
        box = np.abs(out[:, :4] - reference[:, :4])
        score = np.abs(out[:, 4:] - reference[:, 4:]).max((1, 2)) / spread
        fidelity[variant] = {"box_px_median": float(np.median(box)), "box_px_p95": float(np.percentile(box, 95)),
                             "box_px_max": float(box.max()), "score_rel_mean": float(score.mean()),
                             "score_rel_max": float(score.max())}
    return fidelity


def _ops(ops: dict) -> str:
    return ", ".join(f"{op} {n}" for op, n in ops.items()) or "none"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else f"quantize_static failed ({row['ort_error']})"


def _tolerance(parity: dict) -> str:
    default = zeroquant.QuantizeOptions().parity_tolerance
    tolerance = parity.get("tolerance", default)
    return "" if tolerance == default else f" (through at --parity-tolerance {tolerance:g})"


def markdown(results: dict) -> str:
    runs = [run for run in results["runs"] if any(r["run"] == run["date"] for r in results["rows"])]
    threads = ", ".join(f"run {n}: {run['threads']}" for n, run in enumerate(runs, 1))
    lines = ["## Coverage: every torchvision family with BatchNorm, two segmentation models, timm families with "
             "BatchNorm (hybrids included) and YOLO11n", "",
             "Rows come from several runs (the `run` column); each run's machine, load and versions:", ""]
    for number, run in enumerate(runs, 1):
        lines += [f"Run {number}:", *provenance_lines(run), ""]
    lines += [f"Random weights with BN statistics from 3 training-mode passes over noise (graph path and speed, not "
              f"accuracy); zeroquant W8A8 defaults except a short distillation ({DISTILL['images']} images, "
              f"{DISTILL['iterations']} steps). Latency: median of batch-1 runs with the run's onnxruntime threads "
              f"({threads}), FP32, onnxruntime's quantize_static (QDQ, per-channel int8 weights, uint8 activations, "
              "MinMax on 16 noise images) and zeroquant timed interleaved run by run. Float ops: the float islands "
              "left in onnxruntime's optimised graph (ops on the model's own float output listed apart). Parity: the "
              "ONNX file against zeroquant's PyTorch simulation on the distilled images (max difference over the "
              "output's spread, and argmax agreement).", "",
              "| run | family | model | input | ok | integer MACs | float ops left | zq / FP32 | zq / ORT static | "
              "ORT static / FP32 | zq ms | quantize s | parity (max diff, agreement) |",
              "|--:|---|---|--:|:-:|--:|---|--:|--:|--:|--:|--:|---|"]
    number = {run["date"]: n for n, run in enumerate(runs, 1)}
    for r in results["rows"]:
        head = f"| {number[r['run']]} | {r['family']} | {r['model']} | {r['input']} |"
        if not r["ok"]:
            lines.append(f"{head} ✘ | | {r['error']} | | | | | | |")
            continue
        tail = f" (on the output: {_ops(r['output_float_ops'])})" if r["output_float_ops"] else ""
        lines.append(f"{head} ✔ | {100 * r['integer_mac_fraction']:.1f} % | "
                     f"{_ops(r['float_ops'])}{tail} | {r['latency_vs_fp32']:.2f} | {_ratio(r, 'latency_vs_ort')} | "
                     f"{_ratio(r, 'ort_vs_fp32')} | {r['latency_ms']['zeroquant']:.2f} | {r['quantize_s']:.0f} | "
                     f"{r['parity']['relative_max_diff']:.3f}, {r['parity']['top1_agreement']:.0f} %"
                     f"{_tolerance(r['parity'])} |")
    lines.append("")
    for r in results["rows"]:
        if "detection" not in r:
            continue
        found = r["detection"]
        lines += [f"{r['model']} on {found['photos']} real photos ({PHOTOS.relative_to(HERE.parent.parent)}, resized "
                  f"to {r['input']} px), each file's decoded boxes and class scores against the FP32 file's:", "",
                  "| file | box error px, median | p95 | max | score error / score spread, mean | max |",
                  "|---|--:|--:|--:|--:|--:|"]
        for variant in (v for v in found if v != "photos"):
            f = found[variant]
            lines.append(f"| {variant} | {f['box_px_median']:.2f} | {f['box_px_p95']:.2f} | {f['box_px_max']:.2f} | "
                         f"{f['score_rel_mean']:.3f} | {f['score_rel_max']:.3f} |")
        lines.append("")
    for r in results["rows"]:
        if "time_by_kind" not in r:
            continue
        variants = list(r["time_by_kind"])
        lines += [f"Where {r['model']}'s time goes (onnxruntime's profiler, median kernel ms per run):", "",
                  "| layer kind | " + " | ".join(f"{v} ms" for v in variants) + " |",
                  "|---|" + "--:|" * len(variants)]
        for label, ms in kind_rows(list(r["time_by_kind"].values())):
            lines.append(f"| {label} | " + " | ".join("–" if m is None else f"{m:.2f}" for m in ms) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    every = {**CLASSIFIERS, **SEGMENTATION, **TIMM, **DETECTION}
    parser.add_argument("--models", help="comma-separated names: torchvision's, timm:NAME, yolo:CONFIG (default: all "
                                         f"{len(every)} families)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per model (all three variants)")
    parser.add_argument("--parity-tolerance", type=float, help="zeroquant's export check (default: zeroquant's)")
    parser.add_argument("--workdir", type=Path, default=HERE.parent / "out" / "coverage")
    parser.add_argument("--output", type=Path, default=HERE)
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.models.split(",")] if args.models else [n for n, _ in every.values()]
    by_name = {name: (family, size) for family, (name, size) in every.items()}
    unknown = [n for n in chosen if n not in by_name]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    saved = args.output / "coverage.json"
    results = json.loads(saved.read_text()) if saved.exists() and args.models else {"runs": [], "rows": []}
    run, start = provenance() | {"threads": args.threads}, time.perf_counter()
    results["runs"].append(run)
    with progress_display() as progress:
        log = bench_log(progress)
        for name in chosen:
            row = run_model(by_name[name][0], name, by_name[name][1], args, progress, log) | {"run": run["date"]}
            results["rows"] = [r for r in results["rows"] if r["model"] != name] + [row]
            order = list(by_name)
            results["rows"].sort(key=lambda r: order.index(r["model"]))
            run["wall_s"] = round(time.perf_counter() - start, 1)
            args.output.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(results, indent=1) + "\n")
            write_section(args.output / "RESULTS.md", "coverage", markdown(results))
    log(f"wrote {args.output / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
