"""`zeroquant pareto`: the mixed-precision frontier of weight size (or BOPs) against estimated sensitivity."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from zeroquant.cli import options as flags
from zeroquant.cli.workers import run_in_workers
from zeroquant.cli.output import print_json, progress_display, stdout


@flags.takes_options("input_range", "wbits_choices", "abits", "objective", "budget", "method", "ranges", "images",
                     "iterations", "batch_size", "seed", "device", "distill_precision", "keep_first_last", "target_cpu",
                     "cache", helps={
                         "wbits_choices": "Candidate weight bits per layer.",
                         "abits": "Activation bits (uniform, not searched).",
                         "budget": "Mark the best point within: average bits (4.5; MAC-weighted for bops) or a size "
                                   "(0.2MB) / BOPs (3GBOPs).",
                         "ranges": "Activation range method for the measured points.",
                         "images": "Distilled images (and half as many held-out ones).",
                         "seed": "Random seed; the held-out images use seed + 1.",
                         "keep_first_last": "Bits of the inputs of the first and last layer in the measured "
                                            "points, as quantize keeps them (0: like the rest); their weights are "
                                            "searched like every layer's."})
def pareto(
    ctx: typer.Context,
    source: dict,
    options: dict,
    output: Path = typer.Option(..., "-o", "--output", help="Folder for pareto.png and pareto.json."),
    workers: int = flags.WORKERS,
    json_out: bool = typer.Option(False, "--json", help="Print pareto.json on stdout instead of a table."),
) -> None:
    """Measure each layer's sensitivity to every weight bit-width on distilled images, solve the exact frontier,
    check a few of its points end to end on held-out distilled images, and write pareto.png and pareto.json."""
    from zeroquant.distributed import is_main_process
    from zeroquant.pipeline import pareto as run

    run_in_workers(ctx, workers, options["device"])
    with progress_display(quiet=json_out or not is_main_process()) as progress:
        result = run(output=output, progress=progress, **source, **options)
    if not is_main_process():
        return
    if json_out:
        print_json(result.data)
        return
    stdout.print(_table(result.data, output))


def _table(data: dict, output: Path) -> Table:
    """The measured frontier points, then the uniform-precision configurations for comparison."""
    front, abits = data["frontier"], data["abits"]
    rows = [i for i, point in enumerate(front) if "measured" in point]
    size = data["objective"] == "size"
    table = Table(title=f"zeroquant pareto: {data['model']}, {len(rows)} of {len(front)} frontier points (* chosen; "
                        f"all in {output / 'pareto.json'}, plot in pareto.png); KL and agreement measured on "
                        f"{data['held_out_images']} held-out images", title_justify="left", box=box.SIMPLE_HEAD)
    labelled = [(f"{i + 1}{' *' if i == data['chosen'] else ''}", front[i]) for i in rows]
    labelled += [(f"uniform W{b}", p) for b, p in zip(data["choices"], data["uniform"])]
    cells = [[label, f"{p['average_bits']:.2f}", f"{p['size_bytes'] / 1e3:.1f}" if size else f"{p['bops'] / 1e9:.3g}",
              f"{p['sensitivity']:.3g}", f"{p['measured']['weights_only']['kl']:.3g}",
              f"{p['measured']['with_activations']['kl']:.3g}",
              f"{p['measured']['with_activations']['top1_agreement']:.0f} %", "".join(map(str, p["bits"].values()))]
             for label, p in labelled]
    headers = ("point", "avg bits", "KB" if size else "GBOPs", "KL est.", "KL W", f"KL W+A{abits}", f"agree W+A{abits}",
               "bits, layer by layer")
    for j, header in enumerate(headers):  # no_wrap and natural widths: rich would rather drop a column than widen
        table.add_column(header, justify="left" if j in (0, len(headers) - 1) else "right", no_wrap=True,
                         min_width=max(len(header), *(len(row[j]) for row in cells)))
    for n, row in enumerate(cells):
        table.add_row(*row, end_section=n == len(rows) - 1)
    return table
