"""`zeroquant quantize` and `zeroquant distill`."""

from __future__ import annotations

from pathlib import Path

import typer

from zeroquant.cli.app import app
from zeroquant.cli.output import check_writable, key_value_table, parse_shape, print_json, stdout
from zeroquant.progress import progress_bar

DEFAULT_MODEL = "zoo:efficientnet_lite0"
MODEL_HELP = ("torch.export archive, checkpoint/state_dict (with --arch), zoo:NAME, or a pickled module "
              "(with --trust-pickle)")


def _load(model: str, arch, weights, trust_pickle):
    from zeroquant.zoo.loading import load_model

    return load_model(model, arch=arch, weights=weights, trust_pickle=trust_pickle)


@app.command()
def quantize(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    output: Path = typer.Option(None, "-o", "--output", help="ONNX file to write (default: NAME-w8a8.onnx)."),
    arch: str = typer.Option(None, "--arch", help="Zoo architecture for a state_dict/checkpoint file."),
    weights: str = typer.Option(None, "--weights", help="Weights file for a zoo:NAME model."),
    input_shape: str = typer.Option(None, "--input-shape", help="C,H,W when the model does not say."),
    wbits: int = typer.Option(8, "--wbits", help="Weight bits."),
    abits: int = typer.Option(8, "--abits", help="Activation bits."),
    budget: str = typer.Option(None, "--budget", help="Mixed-precision weights: the best point of the size frontier "
                                                       "(see `zeroquant pareto`) within average bits (4.5) or a size "
                                                       "(0.2MB)."),
    method: str = typer.Option("zeroq", "--method", help="Calibration images: zeroq, genie or noise."),
    ranges: str = typer.Option("mse", "--ranges", help="Activation range method: mse, percentile or minmax."),
    images: int = typer.Option(32, "--images", help="Number of distilled images."),
    iterations: int = typer.Option(None, "--iterations", help="Distillation steps (default depends on input size)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Distillation batch size."),
    lr: float = typer.Option(0.2, "--lr", help="Distillation learning rate."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same ONNX bytes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    keep_first_last: int = typer.Option(8, "--keep-first-last", help="Bits of the first and last layer and their "
                                                                    "inputs (0: treat them like the rest)."),
    reconstruct: str = typer.Option("auto", "--reconstruct", help="Block reconstruction (learned rounding and step "
                                                                  "sizes): auto (below 8 bits), on or off."),
    effort: str = typer.Option("default", "--effort", help="Reconstruction effort: fast, default or thorough."),
    bias_correction: str = typer.Option("auto", "--bias-correction", help="Correct the output shift of weight "
                                        "rounding: auto (networks with depthwise convs), on or off."),
    pack_int4: bool = typer.Option(False, "--pack-int4", help="Store weights of <= 4 bits as INT4 (smaller file; "
                                                              "onnxruntime runs those layers in float)."),
    full_range: bool = typer.Option(False, "--full-range", help="Full int8 weight grid (CPUs with VNNI only)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Distil again even if a cached set exists."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a pickled nn.Module (runs its code)."),
    float_output: Path = typer.Option(None, "--float-output", help="Also write the float32 ONNX model here."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Quantize a trained CNN with no real data and write a verified integer ONNX model plus a JSON report."""
    from zeroquant.errors import UsageError
    from zeroquant.pipeline import QuantizeOptions
    from zeroquant.pipeline import quantize as run_quantize
    from zeroquant.search.pareto import parse_budget

    options = QuantizeOptions(wbits, abits, method, ranges, images, batch_size, iterations, lr, seed, device,
                              not full_range, not no_cache, keep_first_last=keep_first_last, reconstruct=reconstruct,
                              effort=effort, bias_correction=bias_correction, pack_int4=pack_int4)
    options.validate()
    if budget is not None and wbits != 8:
        raise UsageError("--budget chooses the weight bits of every layer; it does not combine with --wbits")
    limit = parse_budget(budget) if budget is not None else None
    shape = parse_shape(input_shape)
    loaded = _load(model, arch, weights, trust_pickle)
    output = output or Path(f"{loaded.name}-{f'b{budget}' if budget else f'w{wbits}'}a{abits}.onnx")
    for path in (output, float_output):
        if path:
            check_writable(path)
    notes, chosen = [], ""
    with progress_bar(False if json_out else None) as progress:
        if limit is not None:
            options.layer_bits, note, chosen = _mixed_precision(loaded, shape or loaded.input_shape, options, limit,
                                                                progress)
            notes.append(note)
        report = run_quantize(loaded, output, options, shape, progress, float_output, notes)
    if json_out:
        print_json(report.to_dict())
        return
    census, parity, sizes = report.census, report.parity, report.sizes
    stdout.print(key_value_table(f"zeroquant: {report.model}", [
        ("output", f"{report.output} (+ .json report)"),
        ("bits", f"{_weight_bits(report.layers)}A{abits}, {len(report.layers)} conv/linear layers"
                 f"{f'; {chosen} chosen for --budget {budget} (why: notes in the .json)' if chosen else ''}"),
        ("calibration", f"{report.distillation['images']} {report.distillation['method']} images"
                        f"{' (cached)' if report.timings.get('distill_from_cache') else ''}"),
        ("integer MACs", f"{100 * census['integer_mac_fraction']:.1f} % "
                         f"({len(census['integer_layers'])}/{len(report.layers)} layers in integer kernels)"),
        ("size", f"{sizes['onnx_bytes'] / 1e6:.2f} MB ({sizes['onnx_vs_float32_weights']:.2f}x the float32 weights)"),
        ("parity", f"ONNX vs simulation on the distilled images: {parity['top1_agreement']:.1f} % top-1 agreement, "
                   f"max logit diff {parity['max_abs_logit_diff']:.3g}"),
        ("float ops", ", ".join(report.float_ops) or "none"),
        ("time", ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items() if not isinstance(v, bool))),
    ]))


def _mixed_precision(loaded, shape, options, budget, progress) -> tuple[dict[str, int], str, str]:
    """Bits per layer of the best size-frontier point within the budget, the report note that says why, and the
    point's size."""
    from zeroquant.errors import UsageError
    from zeroquant.search import search
    from zeroquant.search.pareto import DEFAULT_CHOICES, choose, describe, note

    if not shape:
        raise UsageError("the input shape is unknown for this model", "pass --input-shape C,H,W")
    front = search(loaded, shape, options, DEFAULT_CHOICES, "size", progress).front
    cost = budget.cost(front.problem)
    index = choose(front, cost)
    return (front.points[index]["bits"], note(front, index, budget.text, cost),
            describe(front.cost[index], front.problem))


def _weight_bits(layers) -> str:
    bits = sorted({layer.weight_bits for layer in layers})
    return f"W{bits[0]}" if len(bits) == 1 else f"W{bits[0]}-{bits[-1]} (mixed) "


@app.command()
def distill(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for calib.pt (the images as a tensor)."),
    arch: str = typer.Option(None, "--arch"),
    weights: str = typer.Option(None, "--weights"),
    input_shape: str = typer.Option(None, "--input-shape"),
    method: str = typer.Option("zeroq", "--method"),
    images: int = typer.Option(32, "--images"),
    iterations: int = typer.Option(None, "--iterations"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(0.2, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
    preview: Path = typer.Option(None, "--preview", help="Also save a PNG grid of the images here."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Distil only the synthetic calibration set (cached, so a later quantize reuses it)."""
    import io

    import torch

    from zeroquant.calib.preview import check_channels, grid_png
    from zeroquant.errors import UsageError
    from zeroquant.export.onnx_export import write_atomic
    from zeroquant.graph.capture import capture
    from zeroquant.pipeline import QuantizeOptions
    from zeroquant.pipeline import distill as run_distill

    options = QuantizeOptions(method=method, num_images=images, batch_size=batch_size, iterations=iterations, lr=lr,
                              seed=seed, device=device)
    options.validate()
    loaded = _load(model, arch, weights, trust_pickle)
    shape = parse_shape(input_shape) or loaded.input_shape
    if not shape:
        raise UsageError("the input shape is unknown for this model", "pass --input-shape C,H,W")
    output.mkdir(parents=True, exist_ok=True)
    if preview:  # checked before distilling, which can take minutes
        check_channels(shape[0])
        check_writable(preview)
    captured = capture(loaded.module, shape)
    with progress_bar(False if json_out else None) as progress:
        calib, cached = run_distill(loaded, captured.graph_module, shape, options, progress)
    buffer = io.BytesIO()
    torch.save({"images": calib.images, "method": calib.method, "settings": calib.settings}, buffer)
    write_atomic(output / "calib.pt", buffer.getvalue())
    summary = {"output": str(output / "calib.pt"), "images": len(calib.images), "method": calib.method,
               "final_bn_loss": calib.final_loss, "from_cache": cached}
    if preview:
        prep = loaded.preprocessing
        write_atomic(preview, grid_png(calib.images, prep and prep.mean, prep and prep.std))
        summary["preview"] = str(preview)
    if json_out:
        print_json(summary)
    else:
        stdout.print(key_value_table(f"zeroquant distill: {loaded.name}", [(k, str(v)) for k, v in summary.items()]))
