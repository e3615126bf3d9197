"""`zeroquant zoo`: the models zeroquant knows (models.yaml)."""

from __future__ import annotations

import typer
from rich.table import Table

from zeroquant.cli.output import print_json, stdout


def list_zoo(json_out: bool = typer.Option(False, "--json", help="Print the entries as JSON.")) -> None:
    """List the zoo entries: architecture, weights source, input shape, preprocessing."""
    from zeroquant.zoo.registry import zoo_entries

    entries = zoo_entries()
    rows = [{"name": e.name, "arch": e.arch, "input_shape": list(e.input_shape), "preprocessing": e.preprocessing.name,
             "weights": _weights(e), "description": e.description} for e in entries.values()]
    if json_out:
        print_json(rows)
        return
    table = Table(title="zeroquant zoo (models.yaml)", title_justify="left")
    for column in ("name", "arch", "input", "preprocessing", "weights"):
        table.add_column(column, no_wrap=column == "name", overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["arch"], "x".join(map(str, row["input_shape"])), row["preprocessing"],
                      row["weights"])
    stdout.print(table)


def _weights(entry) -> str:
    if not entry.weights:
        return "--weights FILE"
    if "package" in entry.weights:
        return f"package {entry.weights['package'].split(':')[0]}"
    return str(entry.resolve(entry.weights["path"]))
