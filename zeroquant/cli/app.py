"""The typer app and its error contract: expected failures print one line on stderr and exit with their class's
code; tracebacks only with --debug (or ZEROQUANT_DEBUG=1)."""

from __future__ import annotations

import sys
import traceback
import warnings
from dataclasses import dataclass

import typer
from typer.core import TyperGroup

from zeroquant.cli import bench, evaluate, inspect, pareto, quantize, zoo

from zeroquant.errors import (InternalError, ModelLoadError, OutputError, UnsupportedModelError, UsageError,
                              VerificationError, ZeroQuantError, first_line)


class Interrupted(ZeroQuantError):
    """Ctrl-C: every output is written to a temp file and renamed, so nothing partial is left."""

    exit_code = 130


EXIT_CODES = (f"Exit codes: 0 success; 1 other error; "
              f"{UsageError.exit_code} bad option; {ModelLoadError.exit_code} model file cannot be loaded; "
              f"{UnsupportedModelError.exit_code} model cannot be quantized data-free; "
              f"{VerificationError.exit_code} exported model failed verification; "
              f"{OutputError.exit_code} output cannot be written; {InternalError.exit_code} internal error (a bug: rerun "
              f"with --debug); {Interrupted.exit_code} interrupted.")


class _Commands(TyperGroup):
    """Carries Ctrl-C out of typer as Interrupted: typer would turn the KeyboardInterrupt into a silent exit 130.
    Stages see a plain KeyboardInterrupt until here, which their `except Exception` cannot swallow."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise Interrupted("interrupted; no output was written") from exc


app = typer.Typer(
    name="zeroquant",
    cls=_Commands,
    help="Data-free quantization of BatchNorm CNNs into integer ONNX models for CPU inference.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@dataclass
class Session:
    """One invocation: its arguments (for --workers to start the same command in more processes) and --debug."""

    argv: list[str]
    debug: bool = False


@app.callback()
def _root(ctx: typer.Context, debug: bool = typer.Option(False, "--debug", envvar="ZEROQUANT_DEBUG",
                                                         help="Show Python tracebacks for errors.")) -> None:
    ctx.obj.debug = debug
    if not debug:  # third-party deprecation chatter is not for the user's terminal (--debug shows it)
        warnings.simplefilter("ignore")


# every command, registered here and nowhere else (their modules do not import this one)
COMMANDS = {"quantize": quantize.quantize, "distill": quantize.distill, "pareto": pareto.pareto,
            "inspect": inspect.inspect, "eval": evaluate.evaluate, "bench": bench.bench, "zoo": zoo.list_zoo}
for name, command in COMMANDS.items():
    app.command(name)(command)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (usage errors: typer's message and code 2)."""
    session = Session(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=argv, prog_name="zeroquant", obj=session)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except InternalError as exc:  # another process's bug: said as this process's own would be
        return _fail(exc, _bug(exc.message), exc.exit_code, session.debug)
    except ZeroQuantError as exc:
        return _fail(exc, str(exc), exc.exit_code, session.debug)
    except Exception as exc:  # a bug, but the user still gets one line, and the traceback with --debug
        return _fail(exc, _bug(f"{type(exc).__name__}: {first_line(exc)}"), InternalError.exit_code, session.debug)
    return 0


def _bug(what: str) -> str:
    return f"internal error, a bug in zeroquant: {what} (rerun with --debug for the traceback and please report it)"


def _fail(exc: Exception, message: str, code: int, debug: bool) -> int:
    from zeroquant.cli.output import close_stage_line
    from zeroquant.distributed import is_main_process

    if getattr(exc, "shared", False) and not is_main_process():
        return code  # every process of the job has this error; process 0 says it once
    close_stage_line()
    if debug:  # a job's error shows the traceback of the process where it happened
        remote = getattr(exc, "traceback_text", None)
        if remote:
            print(remote, end="", file=sys.stderr)
        else:
            traceback.print_exception(exc, file=sys.stderr)
    print(f"zeroquant: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def run() -> None:
    from zeroquant.distributed import exit_process

    exit_process(main())
