"""Progress without printing: the library's stages announce themselves here and the caller decides what to show.

Every public function takes `progress=`: None (silent), a rich.progress.Progress (one bar per stage), or any callable
that takes a ProgressEvent (a stage starts, advances, and ends with its time). The library itself never prints.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # what runs, e.g. "ZeroQ distillation"
    done: int  # steps done so far
    total: int | None  # steps in all; None for a stage without countable steps
    seconds: float  # since the stage started
    finished: bool = False


Advance = Callable[..., None]


class Progress:
    """Forwards stage events to the caller's sink; a stage yields `advance(n=1)`."""

    def __init__(self, sink=None):
        self.sink = sink.sink if isinstance(sink, Progress) else sink

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Advance]:
        sink, start, done = self.sink, time.perf_counter(), 0
        rich = sink is not None and hasattr(sink, "add_task") and hasattr(sink, "advance")
        task = sink.add_task(name, total=total) if rich else None

        def emit(finished: bool = False) -> None:
            if sink is not None and not rich:
                sink(ProgressEvent(name, done, total, time.perf_counter() - start, finished))

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            if rich:
                sink.advance(task, n)
            else:
                emit()

        emit()
        yield advance
        if rich:
            sink.update(task, completed=total if total is not None else done, total=total or done or 1)
        else:
            emit(finished=True)


SILENT = Progress()
