"""files.write_all: all or nothing, including what was there before. A failure at any point of writing several
files (while writing the temp files, or between the renames) leaves every earlier output byte-identical."""

import errno
import os
from pathlib import Path

import pytest

from zeroquant.errors import OutputError
from zeroquant.files import write_all


@pytest.fixture
def previous(tmp_path) -> dict[Path, bytes]:
    """Outputs a former run left: the ONNX file and its report."""
    files = {tmp_path / "model.onnx": b"old onnx", tmp_path / "model.onnx.json": b'{"old": true}'}
    for path, data in files.items():
        path.write_bytes(data)
    return files


def assert_untouched(folder: Path, previous: dict[Path, bytes]) -> None:
    assert {path: path.read_bytes() for path in folder.iterdir()} == previous  # no temp file or backup left


def new_outputs(previous) -> list[tuple[Path, bytes]]:
    return [(path, b"new " + data) for path, data in previous.items()] + [(next(iter(previous)).with_name("f.onnx"),
                                                                           b"float")]


def fail_rename(monkeypatch, which: int, error: BaseException) -> None:
    """The `which`-th os.replace raises `error` (the earlier ones have moved new files into place)."""
    replace, calls = os.replace, []

    def failing(source, target):
        calls.append(target)
        if len(calls) == which:
            raise error
        return replace(source, target)

    monkeypatch.setattr(os, "replace", failing)


def test_second_write_fails_over_existing_outputs(tmp_path, previous, monkeypatch):
    fsync = os.fsync

    def disk_full_on_report(fd):
        if ".model.onnx.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_on_report)
    with pytest.raises(OutputError, match="No space left on device"):
        write_all(new_outputs(previous))
    assert_untouched(tmp_path, previous)


@pytest.mark.parametrize("error", [OSError(errno.EIO, "I/O error"), KeyboardInterrupt()])
def test_failure_between_the_renames_restores_the_earlier_files(tmp_path, previous, monkeypatch, error):
    """The first rename has put the new ONNX file in place when the second fails (or Ctrl-C comes)."""
    fail_rename(monkeypatch, 2, error)
    with pytest.raises((OutputError, KeyboardInterrupt)):
        write_all(new_outputs(previous))
    assert_untouched(tmp_path, previous)


def test_third_file_new_is_removed_when_the_rename_of_it_fails(tmp_path, previous, monkeypatch):
    fail_rename(monkeypatch, 3, OSError(errno.EIO, "I/O error"))
    with pytest.raises(OutputError, match="I/O error"):
        write_all(new_outputs(previous))
    assert_untouched(tmp_path, previous)


def test_without_hard_links_the_backup_is_a_copy(tmp_path, previous, monkeypatch):
    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    fail_rename(monkeypatch, 2, OSError(errno.EIO, "I/O error"))
    with pytest.raises(OutputError):
        write_all(new_outputs(previous))
    assert_untouched(tmp_path, previous)


def test_success_replaces_every_file_and_leaves_nothing_else(tmp_path, previous):
    outputs = new_outputs(previous)
    write_all(outputs)
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == dict(outputs)
