"""Progress bars: rich, on stderr, and silent when stderr is not a terminal (CI, pipes, --json)."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def stderr_console() -> Console:
    return Console(stderr=True)


@contextlib.contextmanager
def progress_bar(enabled: bool | None = None):
    """Yield a rich Progress on stderr, or None when bars would only litter a log."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=stderr_console(), transient=False) as progress:
        yield progress
