"""`zeroquant quantize` and `zeroquant distill`."""

from __future__ import annotations

from pathlib import Path

import typer

from zeroquant.cli import options as flags
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
    arch: str = flags.ARCH,
    weights: str = flags.WEIGHTS,
    input_shape: str = flags.INPUT_SHAPE,
    wbits: int = flags.WBITS,
    abits: int = flags.ABITS,
    budget: str = typer.Option(None, "--budget", help="Mixed-precision weights: the best point of the size frontier "
                                                       "(see `zeroquant pareto`) within average bits (4.5) or a size "
                                                       "(0.2MB)."),
    method: str = flags.METHOD,
    ranges: str = flags.RANGES,
    images: int = flags.IMAGES,
    iterations: int = flags.ITERATIONS,
    batch_size: int = flags.BATCH_SIZE,
    lr: float = typer.Option(0.2, "--lr", help="Distillation learning rate."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same ONNX bytes."),
    device: str = flags.DEVICE,
    keep_first_last: int = typer.Option(8, "--keep-first-last", help="Bits of the first and last layer and their "
                                                                    "inputs (0: treat them like the rest)."),
    keep_depthwise: int = flags.KEEP_DEPTHWISE,
    reconstruct: str = typer.Option("auto", "--reconstruct", help="Block reconstruction (learned rounding and step "
                                                                  "sizes): auto (below 8 bits), on or off."),
    effort: str = flags.EFFORT,
    bias_correction: str = typer.Option("auto", "--bias-correction", help="Correct the output shift of weight "
                                        "rounding: auto (networks with depthwise convs), on (measured on the "
                                        "distilled images), analytic (from the BN statistics) or off."),
    equalize: bool = typer.Option(False, "--equalize", help="Cross-layer equalization of conv -> ReLU -> conv "
                                                            "chains (exact; off by default, see the ablation)."),
    pack_int4: bool = typer.Option(False, "--pack-int4", help="Store weights of <= 4 bits as INT4 (smaller file; "
                                                              "onnxruntime runs those layers in float)."),
    full_range: bool = flags.FULL_RANGE,
    no_cache: bool = typer.Option(False, "--no-cache", help="Distil again even if a cached set exists."),
    trust_pickle: bool = flags.TRUST_PICKLE,
    float_output: Path = typer.Option(None, "--float-output", help="Also write the float32 ONNX model here."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Quantize a trained CNN with no real data and write a verified integer ONNX model plus a JSON report."""
    from zeroquant.errors import UsageError
    from zeroquant.pipeline import QuantizeOptions
    from zeroquant.pipeline import quantize as run_quantize
    from zeroquant.search import bits_for_budget
    from zeroquant.search.pareto import parse_budget

    options = QuantizeOptions(wbits, abits, method, ranges, images, batch_size, iterations, lr, seed, device,
                              not full_range, not no_cache, keep_first_last=keep_first_last,
                              keep_depthwise=keep_depthwise, reconstruct=reconstruct, effort=effort,
                              bias_correction=bias_correction, equalize=equalize, pack_int4=pack_int4)
    options.validate()
    if budget is not None and wbits != 8:
        raise UsageError("--budget chooses the weight bits of every layer; it does not combine with --wbits")
    limit = parse_budget(budget) if budget is not None else None
    loaded = _load(model, arch, weights, trust_pickle)
    shape = loaded.shape(parse_shape(input_shape))
    output = output or Path(f"{loaded.name}-{f'b{budget}' if budget else f'w{wbits}'}a{abits}.onnx")
    for path in (output, float_output):
        if path:
            check_writable(path)
    notes, chosen, calib = [], "", None
    with progress_bar(False if json_out else None) as progress:
        if limit is not None:
            choice = bits_for_budget(loaded, shape, options, limit, progress)
            options.layer_bits, chosen, calib = choice.layer_bits, choice.chosen, choice.calib
            notes.append(choice.note)
        report = run_quantize(loaded, output, options, shape, progress, float_output, notes, calib)
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


def _weight_bits(layers) -> str:
    bits = sorted({layer.weight_bits for layer in layers})
    return f"W{bits[0]}" if len(bits) == 1 else f"W{bits[0]}-{bits[-1]} (mixed) "


@app.command()
def distill(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for calib.pt (the images as a tensor)."),
    arch: str = flags.ARCH,
    weights: str = flags.WEIGHTS,
    input_shape: str = flags.INPUT_SHAPE,
    method: str = flags.METHOD,
    images: int = flags.IMAGES,
    iterations: int = flags.ITERATIONS,
    batch_size: int = flags.BATCH_SIZE,
    lr: float = typer.Option(0.2, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    device: str = flags.DEVICE,
    trust_pickle: bool = flags.TRUST_PICKLE,
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
    shape = loaded.shape(parse_shape(input_shape))
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
