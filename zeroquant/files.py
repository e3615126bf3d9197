"""Writing output files so that a failure or Ctrl-C never leaves a partial one: every stage that writes uses this."""

from __future__ import annotations

import os
import secrets
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


def _folder_of(path: Path) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}", "create it or choose another -o path")
    return folder


def _temp_beside(path: Path, data: bytes, label: str = "tmp") -> Path:
    """`data` in a new file in the target's folder (so a rename moves it in atomically), synced to disk."""
    folder = _folder_of(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=f".{label}")
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
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
        raise
    return Path(tmp)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write beside the target and rename, so an interrupted or failed write never leaves a partial file."""
    write_all([(path, data)])


def write_all(files: list[tuple[str | Path, bytes]]) -> None:
    """Write every (path, bytes), or none, leaving what was there before exactly as it was on any failure or
    Ctrl-C: every file goes to a temp file beside its target first; only when all are on disk are they renamed
    into place, each previous file kept under a hard link until the last rename succeeded, and moved back if one
    failed."""
    targets = [Path(path) for path, _ in files]
    temps: list[Path] = []
    backups: dict[Path, Path] = {}  # target -> link to the file it replaced
    placed: list[Path] = []
    try:
        for target, (_, data) in zip(targets, files):
            temps.append(_temp_beside(target, data))
        for target in targets:
            if target.exists():
                backups[target] = _link_beside(target)
        for target, temp in zip(targets, temps):
            try:
                os.replace(temp, target)
            except OSError as exc:
                raise OutputError(f"cannot write {target}: {exc.strerror}") from exc
            placed.append(target)
    except BaseException:
        for target in reversed(placed):
            if target in backups:
                os.replace(backups.pop(target), target)
            else:
                target.unlink(missing_ok=True)  # ours, written just now: there was no file before
        for leftover in [*temps, *backups.values()]:
            leftover.unlink(missing_ok=True)
        raise
    for backup in backups.values():
        backup.unlink(missing_ok=True)


def _link_beside(path: Path) -> Path:
    """A second name for `path`'s current file (its bytes stay on disk after a rename replaces `path`)."""
    name = _folder_of(path) / f".{path.name}.{secrets.token_hex(8)}.old"
    try:
        os.link(path, name)
    except OSError:  # a file system without hard links: a copy does the same job
        return _temp_beside(path, path.read_bytes(), "old")
    return name
