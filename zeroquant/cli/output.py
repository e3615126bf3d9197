"""What commands print: results to stdout (a rich table, or JSON with --json); progress to stderr, as rich bars on a
terminal and one line per stage (its name, then its time) anywhere else, so a piped log is never silent for long."""

from __future__ import annotations

import contextlib
import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from zeroquant.progress import ProgressEvent

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


def warn(text: str | None) -> None:
    """A warning: one line on stderr (nothing when text is None)."""
    if text:
        print(f"zeroquant: warning: {' '.join(text.split())}", file=sys.stderr)


_open_line = False  # a stage line is waiting for its time


def stage_lines(event: ProgressEvent) -> None:
    """One line per stage on stderr: the name when it starts, its time when it ends, on the same line."""
    global _open_line
    if event.finished:
        print(f" {event.seconds:.1f} s", file=sys.stderr, flush=True)
        _open_line = False
    elif event.done == 0:
        steps = f" ({event.total} steps)" if event.total else ""
        print(f"zeroquant: {event.stage}{steps} ...", end="", file=sys.stderr, flush=True)
        _open_line = True


def close_stage_line() -> None:
    """A stage that raised never ends its line: say so, so that the error starts a line of its own."""
    global _open_line
    if _open_line:
        print(" failed", file=sys.stderr, flush=True)
        _open_line = False


@contextlib.contextmanager
def progress_display(quiet: bool = False):
    """The sink for the library's progress: rich bars on a terminal, stage lines elsewhere, nothing when quiet."""
    if quiet:
        yield None
    elif sys.stderr.isatty():
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=Console(stderr=True), transient=False) as bars:
            yield bars
    else:
        yield stage_lines
