"""`zeroquant quantize` and `zeroquant distill`: flags in, zeroquant.quantize / zeroquant.distill, results out."""

from __future__ import annotations

from pathlib import Path

import typer

from zeroquant.cli import options as flags
from zeroquant.cli.workers import run_in_workers
from zeroquant.cli.output import key_value_table, print_json, progress_display, stdout, warn


def default_output(model: str, budget: str | None, wbits: int, abits: int) -> Path:
    """NAME-w8a8.onnx (or NAME-b4.5a8.onnx for a budget) in the current folder, NAME from the file or zoo name."""
    name = model.removeprefix("zoo:") if model.startswith("zoo:") else Path(model).stem
    return Path(f"{name}-{f'b{budget}' if budget else f'w{wbits}'}a{abits}.onnx")


@flags.takes_options("input_range", "wbits", "abits", "budget", "wbits_choices", "objective", "method", "ranges",
                     "images", "iterations", "batch_size", "lr", "seed", "device", "distill_precision",
                     "keep_first_last", "keep_depthwise", "rounding", "reconstruct", "effort", "bias_correction",
                     "equalize", "pack_int4", "pad_channels", "parity_tolerance", "target_cpu", "cache")
def quantize(
    ctx: typer.Context,
    source: dict,
    options: dict,
    output: Path = typer.Option(None, "-o", "--output", help="ONNX file to write (default: NAME-w8a8.onnx)."),
    calibration: Path = typer.Option(None, "--calibration", help="Calibrate on this calib.pt (from `zeroquant "
                                                                 "distill`) instead of distilling."),
    float_output: Path = typer.Option(None, "--float-output", help="Also write the float32 ONNX model here."),
    workers: int = flags.WORKERS,
    json_out: bool = flags.JSON,
) -> None:
    """Quantize a trained CNN with no real data and write a verified integer ONNX model plus a JSON report."""
    from zeroquant.distributed import is_main_process
    from zeroquant.pipeline import quantize as run

    run_in_workers(ctx, workers, options["device"])
    budget, abits = options["budget"], options["abits"]
    output = output or default_output(source["model"], budget, options["wbits"], abits)
    with progress_display(quiet=json_out or not is_main_process()) as progress:
        result = run(output=output, calibration=calibration, float_output=float_output, progress=progress, **source,
                     **options)
    report = result.report
    if not is_main_process():
        return
    for note in report.notes:
        if note.startswith("warning: "):
            warn(note.removeprefix("warning: "))
    if json_out:
        print_json(report.to_dict())
        return
    census, parity, sizes = report.census, report.parity, report.sizes
    distilled_in = report.distillation["settings"].get("precision")
    stdout.print(key_value_table(f"zeroquant: {report.model}", [
        ("output", f"{report.output} (+ .json report)"),
        ("bits", f"{_weight_bits(report.layers)}A{abits}, {len(report.layers)} conv/linear layers"
                 f"{f'; chosen for --budget {budget} (why: notes in the .json)' if budget else ''}"),
        ("calibration", f"{report.distillation['images']} {report.distillation['method']} images"
                        f"{' distilled in bfloat16' if distilled_in == 'bfloat16' else ''}"
                        f"{' (cached)' if report.timings.get('distill_from_cache') else ''}"),
        ("integer MACs", f"{100 * census['integer_mac_fraction']:.1f} % "
                         f"({len(census['integer_layers'])}/{len(report.layers)} layers in integer kernels)"),
        ("size", f"{sizes['onnx_bytes'] / 1e6:.2f} MB ({sizes['onnx_vs_float32_weights']:.2f}x the float32 weights)"),
        ("export check", f"onnxruntime's logits within {100 * parity['relative_max_diff']:.1f} % of their range of "
                         f"the simulation's on the distilled images (top-1 agreement {parity['top1_agreement']:.1f} "
                         "%: those images sit near class boundaries, so this checks the export, not accuracy; "
                         "`zeroquant eval` measures accuracy on your images)"),
        ("float ops", ", ".join(report.float_ops) or "none"),
        ("time", ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items() if not isinstance(v, bool))),
    ]))


def _weight_bits(layers) -> str:
    bits = sorted({layer.weight_bits for layer in layers})
    return f"W{bits[0]}" if len(bits) == 1 else f"W{bits[0]}-{bits[-1]} (mixed) "


@flags.takes_options("method", "images", "iterations", "batch_size", "lr", "seed", "device", "distill_precision",
                     "cache")
def distill(
    ctx: typer.Context,
    source: dict,
    options: dict,
    output: Path = typer.Option(..., "-o", "--output", help="The calib.pt to write (or a folder for calib.pt)."),
    preview: Path = typer.Option(None, "--preview", help="Also save a PNG grid of the images here."),
    workers: int = flags.WORKERS,
    json_out: bool = flags.JSON,
) -> None:
    """Distil only the synthetic calibration set (cached, so a later quantize reuses it; `quantize --calibration`
    reads the calib.pt)."""
    from zeroquant.distributed import is_main_process
    from zeroquant.pipeline import distill_calibration

    run_in_workers(ctx, workers, options["device"])
    if output.is_dir():
        output = output / "calib.pt"
    with progress_display(quiet=json_out or not is_main_process()) as progress:
        calib, job, cached = distill_calibration(output=output, progress=progress, preview=preview, **source,
                                                 **options)
    if not is_main_process():
        return
    summary = {"output": str(output), "images": len(calib.images), "method": calib.method,
               "final_bn_loss": calib.final_loss, "from_cache": cached}
    if preview:
        summary["preview"] = str(preview)
    if json_out:
        print_json(summary)
    else:
        rows = [(k, str(v)) for k, v in summary.items()]
        stdout.print(key_value_table(f"zeroquant distill: {job.loaded.name}", rows))
