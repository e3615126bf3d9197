"""User-facing errors. Each class is one documented failure class with its own exit code (see README)."""

import re


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line, cut at `limit` characters, or its class name when it says nothing:
    library errors go on to paragraphs of advice that are not ours."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def brief(error: BaseException) -> str:
    """The error's class and the first sentence of its first line, for a cause inside one of our messages."""
    return f"{type(error).__name__}: {re.split(r'(?<=[.]) ', first_line(error))[0]}"[:200]


class ZeroQuantError(Exception):
    """An expected failure: the CLI prints its one-line message and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(ZeroQuantError):
    """An option value or combination that cannot work (bad bit-width, impossible budget, bad shape)."""

    exit_code = 2


class ModelLoadError(ZeroQuantError):
    """The model file is missing, unreadable, of an unsupported kind, or does not match its architecture."""

    exit_code = 3


class UnsupportedModelError(ZeroQuantError):
    """The model loads but cannot be quantized data-free (no BatchNorm, non-finite weights, rejected input)."""

    exit_code = 4


class VerificationError(ZeroQuantError):
    """The exported ONNX model failed a check (checker, onnxruntime session, parity); nothing was written."""

    exit_code = 5


class OutputError(ZeroQuantError):
    """The output could not be written (missing or read-only folder, disk full)."""

    exit_code = 6


class InternalError(ZeroQuantError):
    """An unexpected exception (a bug, or out of memory) in one process of a job of several, carried to every
    process: its class and first line as the message, the failing process's traceback as text for --debug."""

    exit_code = 70

    def __init__(self, message: str, hint: str | None = None, traceback_text: str = ""):
        super().__init__(message, hint)
        self.traceback_text = traceback_text
