"""`zeroquant pareto`: the mixed-precision frontier of weight size (or BOPs) against estimated sensitivity."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from zeroquant.cli import options as flags
from zeroquant.cli.app import app
from zeroquant.cli.output import check_writable, parse_shape, print_json, stdout
from zeroquant.cli.quantize import DEFAULT_MODEL, MODEL_HELP, _load
from zeroquant.progress import progress_bar

MEASURED = 5  # frontier points checked end to end, besides the chosen one


@app.command()
def pareto(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for pareto.png and pareto.json."),
    arch: str = flags.ARCH,
    weights: str = flags.WEIGHTS,
    input_shape: str = flags.INPUT_SHAPE,
    wbits_choices: str = typer.Option("2,3,4,5,6,8", "--wbits-choices", help="Candidate weight bits per layer."),
    abits: int = typer.Option(8, "--abits", help="Activation bits (uniform, not searched)."),
    objective: str = typer.Option("size", "--objective", help="Cost axis: size (packed weight bits) or bops."),
    budget: str = typer.Option(None, "--budget", help="Mark the best point within: average bits (4.5; MAC-weighted "
                                                       "for bops) or a size (0.2MB) / BOPs (3GBOPs)."),
    method: str = typer.Option("zeroq", "--method", help="Calibration images, as for quantize."),
    ranges: str = typer.Option("mse", "--ranges", help="Activation range method for the measured points."),
    images: int = typer.Option(32, "--images", help="Distilled images (and half as many held-out ones)."),
    iterations: int = flags.ITERATIONS,
    batch_size: int = flags.BATCH_SIZE,
    seed: int = typer.Option(0, "--seed", help="Random seed; the held-out images use seed + 1."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (distillation)."),
    keep_first_last: int = typer.Option(8, "--keep-first-last", help="Least bits of the first and last layer, as "
                                                                    "quantize pins them (0: searched like the rest)."),
    full_range: bool = flags.FULL_RANGE,
    no_cache: bool = typer.Option(False, "--no-cache", help="Distil and measure sensitivity again."),
    trust_pickle: bool = flags.TRUST_PICKLE,
    json_out: bool = typer.Option(False, "--json", help="Print pareto.json on stdout instead of a table."),
) -> None:
    """Measure each layer's sensitivity to every weight bit-width on distilled images, solve the exact frontier,
    check a few of its points end to end on held-out distilled images, and write pareto.png and pareto.json."""
    from zeroquant.errors import OutputError, UsageError
    from zeroquant.export.onnx_export import write_atomic
    from zeroquant.pipeline import QuantizeOptions
    from zeroquant.search import measure, search
    from zeroquant.search.pareto import OBJECTIVES, choose, parse_budget, parse_choices, spread, uniform_points
    from zeroquant.search.plot import render

    if objective not in OBJECTIVES:
        raise UsageError(f"unknown --objective '{objective}'", f"choose one of {', '.join(OBJECTIVES)}")
    choices = parse_choices(wbits_choices)
    limit = parse_budget(budget, choices, objective) if budget is not None else None
    options = QuantizeOptions(8, abits, method, ranges, images, batch_size, iterations, seed=seed, device=device,
                              reduce_range=not full_range, use_cache=not no_cache, keep_first_last=keep_first_last)
    options.validate()
    loaded = _load(model, arch, weights, trust_pickle)
    shape = loaded.shape(parse_shape(input_shape))
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {output}: {exc.strerror}", "choose a writable folder") from exc
    check_writable(output / "pareto.json")
    with progress_bar(False if json_out else None) as progress:
        found = search(loaded, shape, options, choices, objective, progress)
        problem, front = found.problem, found.front
        cost = limit.cost(problem) if limit is not None else None
        chosen = choose(front, cost) if cost is not None else None
        checked, uniform = spread(front, MEASURED, chosen), uniform_points(problem)
        points = [front.points[i] for i in checked] + uniform
        results, held_out = measure(found, loaded, shape, options, [p["bits"] for p in points], progress)
    for point, result in zip(points, results):
        point["measured"] = result
    data = {
        "model": loaded.name, "objective": objective, "abits": abits, "choices": list(choices),
        "total_params": int(problem.params.sum()), "total_macs": int(problem.macs.sum()),
        "layers": [{"name": name, "params": int(params), "macs": int(macs), "least_bits": int(floor),
                    "sensitivity": dict(zip(map(str, found.measured_bits), row.tolist()))}
                   for name, params, macs, floor, row in zip(*(problem.layers, problem.params, problem.macs,
                                                               problem.floor, found.kl))],
        "frontier": front.points, "uniform": uniform, "chosen": chosen,
        "budget": None if cost is None else {"text": budget,
                                             **({"size_bytes": cost / 8} if objective == "size" else {"bops": cost})},
        "calibration_images": len(found.calib.images), "held_out_images": held_out,
        "timings": found.timings,
        "notes": ["sensitivity: KL divergence from the FP32 softmax with only that layer's weights quantized, "
                  "averaged over the distilled images; a point's estimate is the sum over layers",
                  "size_bytes: weights packed at their bit-width; the ONNX file stores every weight as int8",
                  "measured: plain rounding with calibrated activations; quantize may add block reconstruction"],
    }
    write_atomic(output / "pareto.json", json.dumps(data, indent=1).encode())
    write_atomic(output / "pareto.png", render(data))
    if json_out:
        print_json(data)
        return
    stdout.print(_table(data, checked, output))


def _table(data: dict, rows: list[int], output: Path) -> Table:
    """The measured frontier points, then the uniform-precision configurations for comparison."""
    front, abits = data["frontier"], data["abits"]
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
