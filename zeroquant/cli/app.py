"""The typer app and its error contract: expected failures print one line on stderr and exit with their class's
code; tracebacks only with --debug (or ZEROQUANT_DEBUG=1)."""

from __future__ import annotations

import os
import signal
import sys

import typer

from zeroquant.errors import ZeroQuantError

app = typer.Typer(
    name="zeroquant",
    help="Data-free quantization of BatchNorm CNNs into integer ONNX models for CPU inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Interrupted(ZeroQuantError):
    """Ctrl-C: every output is written to a temp file and renamed, so nothing partial is left."""

    exit_code = 130


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors.")) -> None:
    if debug:
        os.environ["ZEROQUANT_DEBUG"] = "1"


def _interrupt(signum, frame):
    raise Interrupted("interrupted; no output was written")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (usage errors: typer's message and code 2)."""
    from zeroquant.cli import evaluate, quantize, zoo  # noqa: F401  (each module adds its commands to `app`)

    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        app(args=argv, prog_name="zeroquant")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ZeroQuantError as exc:
        if os.environ.get("ZEROQUANT_DEBUG") == "1":
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        print(f"zeroquant: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def run() -> None:
    sys.exit(main())
