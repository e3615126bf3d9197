"""`zeroquant bench`: onnxruntime CPU latency, size and integer-kernel census of ONNX models, side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from zeroquant.cli.output import print_json, progress_display, stdout, warn


def bench(
    model: Path = typer.Argument(..., help="ONNX model to measure."),
    vs: list[Path] = typer.Option(None, "--vs", help="Model to compare with (repeatable); ratios are MODEL / OTHER."),
    batch: int = typer.Option(1, "--batch", help="Images per run."),
    threads: int = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: one per core)."),
    runs: int = typer.Option(None, "--runs", help="Timed runs per model (default: enough for about 10 s)."),
    profile: bool = typer.Option(False, "--profile", help="Also time every kernel with onnxruntime's profiler and "
                                                          "show the time per layer kind (depthwise, pointwise, ...)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Latency (median, p90), throughput, file size and the kernels onnxruntime runs; with --vs, every model is
    timed interleaved run by run in the same process, so the ratios are not skewed by changing machine load."""
    from zeroquant.errors import UsageError
    from zeroquant.census import kernel_census
    from zeroquant.evaluate.latency import measure, time_by_kind
    from zeroquant.runtime import weight_grid_warning

    if batch < 1 or (runs is not None and runs < 1) or (threads is not None and threads < 1):
        raise UsageError("--batch, --runs and --threads must be positive")
    paths = [model, *(vs or [])]
    with progress_display(quiet=json_out) as progress:
        latencies = measure(paths, batch, threads, runs, progress=progress)
    for path in paths:  # once measure() has found them all loadable
        warn(weight_grid_warning(path))
    rows = [lat.to_dict() | {"bytes": p.stat().st_size, "census": kernel_census(p)} for p, lat in zip(paths, latencies)]
    if profile:
        for path, row in zip(paths, rows):
            row["time_by_kind"] = [k.to_dict() for k in time_by_kind(path, batch, threads, min(latencies[0].runs, 200))]
    for row in rows[1:]:
        row["ratio"] = {"latency": rows[0]["median_ms"] / row["median_ms"], "size": rows[0]["bytes"] / row["bytes"]}
    if json_out:
        print_json({"batch": batch, "threads": threads, "runs": latencies[0].runs, "models": rows})
        return
    table = Table(title=f"zeroquant bench: batch {batch}, {threads or 'default'} threads, {latencies[0].runs} "
                        "interleaved runs", title_justify="left")
    kernels = Table(title="kernels onnxruntime runs", title_justify="left")
    for column in ("model", "MB", "median ms", "p90 ms", "images/s", "MODEL / this"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=column != "model",
                         overflow="fold")
    for column in ("model", "integer MACs", "integer kernels", "float conv/gemm"):
        kernels.add_column(column, justify="right" if column == "integer MACs" else "left", overflow="fold")
    for i, row in enumerate(rows):
        name, census = Path(row["path"]).name + (" (MODEL)" if i == 0 else ""), row["census"]
        table.add_row(name, f"{row['bytes'] / 1e6:.2f}", f"{row['median_ms']:.3f}", f"{row['p90_ms']:.3f}",
                      f"{row['images_per_s']:.0f}", f"{row['ratio']['latency']:.2f}x" if i else "")
        kernels.add_row(name, f"{100 * census['integer_mac_fraction']:.1f} %", _counts(census["integer_kernels"]),
                        _counts(census["float_kernels"]))
    stdout.print(table)
    stdout.print(kernels)
    if profile:
        stdout.print(_profile_table(rows))


def _profile_table(rows: list[dict]) -> Table:
    """Kernel ms per layer kind, one column per model, MODEL / this for the --vs models."""
    from zeroquant.evaluate.latency import kind_rows

    table = Table(title="where the time goes: onnxruntime profiler, median kernel ms per run", title_justify="left")
    table.add_column("layer kind (layers)")
    for i, row in enumerate(rows):
        table.add_column(Path(row["path"]).name + (" (MODEL)" if i == 0 else ""), justify="right", overflow="fold")
        if i:
            table.add_column("MODEL / this", justify="right")
    for label, ms in kind_rows([row["time_by_kind"] for row in rows]):
        cells = [label]
        for i, this in enumerate(ms):
            cells.append("–" if this is None else f"{this:.3f}")
            if i:
                cells.append(f"{ms[0] / this:.2f}x" if ms[0] is not None and this else "–")
        table.add_row(*cells)
    return table


def _counts(ops: dict[str, int]) -> str:
    return "\n".join(f"{op} {n}" for op, n in ops.items()) or "none"
