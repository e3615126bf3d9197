"""What commands print: results to stdout (a rich table, or JSON with --json), everything else to stderr."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

stdout = Console(soft_wrap=True)


def print_json(data) -> None:
    """Plain JSON on stdout, no colour or wrapping, so machines can parse it."""
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def parse_shape(text: str | None) -> tuple[int, int, int] | None:
    from zeroquant.errors import UsageError

    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input-shape must be C,H,W with positive integers, got '{text}'")
    return shape


def check_writable(path: Path) -> None:
    """Fail at once, not after minutes of distillation, when the folder of an output file cannot take it."""
    from zeroquant.errors import OutputError

    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}", "create it or choose another path")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror}", "choose a writable folder") from exc
