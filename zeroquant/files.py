"""Writing output files so that a failure or Ctrl-C never leaves a partial one: every stage that writes uses this."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from zeroquant.errors import OutputError

CACHE_ENV = "ZEROQUANT_CACHE"


def cache_root() -> Path:
    """~/.cache/zeroquant (XDG_CACHE_HOME respected), or ZEROQUANT_CACHE: every cache of zeroquant lives below it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zeroquant"
    return Path(os.environ.get(CACHE_ENV, default))


def check_writable(path: str | Path) -> None:
    """Fail at once, not after minutes of distillation, when the folder of an output file cannot take it."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}", "create it or choose another path")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror}", "choose a writable folder") from exc


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write beside the target and rename, so an interrupted or failed write never leaves a partial file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}", "create it or choose another -o path")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror}") from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; outputs get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
        raise


def write_all(files: list[tuple[str | Path, bytes]]) -> None:
    """Write every (path, bytes) atomically, or none: a failed or interrupted write removes those already written."""
    written = []
    try:
        for path, content in files:
            write_atomic(path, content)
            written.append(Path(path))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
