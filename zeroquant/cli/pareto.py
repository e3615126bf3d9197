"""`zeroquant pareto`: the mixed-precision frontier of weight size (or BOPs) against estimated sensitivity."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from zeroquant.cli import options as flags
from zeroquant.cli.app import app, run_in_workers
from zeroquant.cli.output import parse_shape, print_json, progress_display, stdout


@app.command()
def pareto(
    model: str = flags.MODEL,
    output: Path = typer.Option(..., "-o", "--output", help="Folder for pareto.png and pareto.json."),
    arch: str = flags.ARCH,
    weights: str = flags.WEIGHTS,
    input_shape: str = flags.INPUT_SHAPE,
    input_range: str = flags.INPUT_RANGE,
    wbits_choices: str = typer.Option("2,3,4,5,6,8", "--wbits-choices", help="Candidate weight bits per layer."),
    abits: int = typer.Option(8, "--abits", help="Activation bits (uniform, not searched)."),
    objective: str = flags.OBJECTIVE,
    budget: str = typer.Option(None, "--budget", help="Mark the best point within: average bits (4.5; MAC-weighted "
                                                       "for bops) or a size (0.2MB) / BOPs (3GBOPs)."),
    method: str = flags.METHOD,
    ranges: str = typer.Option("mse", "--ranges", help="Activation range method for the measured points."),
    images: int = typer.Option(32, "--images", help="Distilled images (and half as many held-out ones)."),
    iterations: int = flags.ITERATIONS,
    batch_size: int = flags.BATCH_SIZE,
    seed: int = typer.Option(0, "--seed", help="Random seed; the held-out images use seed + 1."),
    device: str = flags.DEVICE,
    keep_first_last: int = typer.Option(8, "--keep-first-last", help="Least bits of the first and last layer, as "
                                                                    "quantize pins them (0: searched like the rest)."),
    target_cpu: str = flags.TARGET_CPU,
    no_cache: bool = flags.NO_CACHE,
    trust_pickle: bool = flags.TRUST_PICKLE,
    workers: int = flags.WORKERS,
    json_out: bool = typer.Option(False, "--json", help="Print pareto.json on stdout instead of a table."),
) -> None:
    """Measure each layer's sensitivity to every weight bit-width on distilled images, solve the exact frontier,
    check a few of its points end to end on held-out distilled images, and write pareto.png and pareto.json."""
    from zeroquant.distributed import is_main_process
    from zeroquant.pipeline import pareto as run

    run_in_workers(workers, device)
    with progress_display(quiet=json_out or not is_main_process()) as progress:
        result = run(model, output, input_shape=parse_shape(input_shape), arch=arch, weights=weights,
                     trust_pickle=trust_pickle, progress=progress, input_range=flags.parse_range(input_range),
                     wbits_choices=flags.parse_choices(wbits_choices),
                     abits=abits, objective=objective, budget=budget, method=method, ranges=ranges, images=images,
                     iterations=iterations, batch_size=batch_size, seed=seed, device=device,
                     keep_first_last=keep_first_last, target_cpu=target_cpu, cache=not no_cache)
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
