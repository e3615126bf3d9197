"""`zeroquant inspect`: why a quantized model loses accuracy, layer by layer."""

from __future__ import annotations

import typer
from rich import box
from rich.table import Table

from zeroquant.cli import options as flags
from zeroquant.cli.output import key_value_table, print_json, progress_display, stdout


@flags.takes_options("input_range", "wbits", "abits", "method", "ranges", "images", "iterations", "batch_size", "seed",
                     "device", "distill_precision", "keep_first_last", "keep_depthwise", "reconstruct", "effort",
                     "target_cpu")
def inspect(
    source: dict,
    options: dict,
    quant_report: bool = typer.Option(False, "--quant-report", help="Per-layer SQNR of the quantized simulation "
                                                                    "and the BN statistics distillation missed."),
    top: int = typer.Option(15, "--top", help="Show the N worst layers of each table (0: all)."),
    json_out: bool = flags.JSON,
) -> None:
    """Measure, on the distilled images, what `quantize` with the same options would export: each layer's output
    SQNR against the float model (with everything quantized, and with weights only) and its weight SQNR, worst
    first; and the BatchNorm statistics the distilled images still miss, worst first."""
    from zeroquant.errors import UsageError
    from zeroquant.pipeline import inspect as measure

    if not quant_report:
        raise UsageError("nothing to inspect", "pass --quant-report")
    if top < 0:
        raise UsageError("--top must be 0 (all) or positive")
    with progress_display(quiet=json_out) as progress:
        report = measure(top=top or None, progress=progress, **source, **options)
    if json_out:
        print_json(report)
        return
    distilled = report["distillation"]
    stdout.print(key_value_table(f"zeroquant inspect: {report['model']}", [
        ("bits", f"W{options['wbits']}A{options['abits']}" + (f", first and last layer at {options['keep_first_last']}"
                                                             if options["keep_first_last"] else "")),
        ("calibration", f"{distilled['images']} {distilled['method']} images"
                        f"{' (cached)' if distilled['from_cache'] else ''}, final BN loss "
                        f"{distilled['final_bn_loss']:.4g}"),
    ]))
    table = Table(title="SQNR in dB against FP32 on the distilled images, worst first: each layer's output with "
                        "weights and activations quantized (W+A) or weights only (W), and its weights",
                  title_justify="left", box=box.SIMPLE)
    for column in ("layer", "kind", "W bits", "in bits", "W+A", "W", "weights"):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for row in report["layers"]:
        table.add_row(row["name"], row["kind"], str(row["weight_bits"]), str(row["input_bits"] or "float"),
                      *(f"{row[key]:.1f}" for key in ("sqnr_db", "weights_only_sqnr_db", "weight_sqnr_db")))
    stdout.print(table)
    if not report["bn_mismatch"]:
        stdout.print(f"no BatchNorm statistics were matched ({distilled['method']} calibration)")
        return
    table = Table(title="BatchNorm statistics missed after distillation, worst first (ZeroQ loss: mean + std "
                        "distance)", title_justify="left", box=box.SIMPLE)
    table.add_column("BatchNorm layer")
    table.add_column("mismatch", justify="right")
    for row in report["bn_mismatch"]:
        table.add_row(row["layer"], f"{row['mismatch']:.4g}")
    stdout.print(table)
