"""Flags made from QuantizeOptions: each flag is named after the field it sets (`wbits` is `--wbits`) and takes its
default and help from it, so the Python API and the CLI cannot drift apart. A command names the fields it takes
(`takes_options`) and receives the model-loading flags and those fields' values already parsed, as the library's
keywords."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from dataclasses import fields

import typer

from zeroquant.errors import UsageError
from zeroquant.options import QuantizeOptions

FIELDS = {f.name: f for f in fields(QuantizeOptions)}
DEFAULT_MODEL = "zoo:efficientnet_lite0"

MODEL = typer.Argument(DEFAULT_MODEL, help="torch.export archive, checkpoint/state_dict (with --arch), zoo:NAME, or "
                                           "a pickled module (with --trust-pickle)")
ARCH = typer.Option(None, "--arch", help="Zoo architecture for a state_dict/checkpoint file.")
WEIGHTS = typer.Option(None, "--weights", help="Weights file for a zoo:NAME model.")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="C,H,W when the model does not say.")
TRUST_PICKLE = typer.Option(False, "--trust-pickle", help="Allow a pickled nn.Module (runs its code).")
WORKERS = typer.Option(1, "--workers", help="Local processes to share the work (gloo on CPU); the same file as 1. "
                                            "Several GPUs or machines: torchrun ... -m zeroquant instead.")
JSON = typer.Option(False, "--json", help="Print the result as JSON.")
NO_CACHE = typer.Option(not FIELDS["cache"].default, "--no-cache",
                        help="Distil (and measure sensitivity) again even if cached.")


def flag(name: str, help: str | None = None):
    """The typer option for QuantizeOptions field `name`: its default (tuples as the comma-separated text the flag
    takes) and its help, or a command's own wording of it."""
    default = FIELDS[name].default
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    spelled = f"--{name.replace('_', '-')}"
    names = [f"{spelled}/--no-{spelled[2:]}"] if default is True else [spelled]  # a flag that is on turns off
    return typer.Option(default, *names, help=help or FIELDS[name].metadata["help"])


LOADING = {"model": (str, MODEL), "arch": (str, ARCH), "weights": (str, WEIGHTS), "input_shape": (str, INPUT_SHAPE),
           "trust_pickle": (bool, TRUST_PICKLE)}


def takes_options(*names: str, helps: dict[str, str] | None = None):
    """Adds the model-loading flags and a flag for each named QuantizeOptions field ("cache" is --no-cache) to a
    command's own, and calls it with `source` (model and loading keywords) and `options` (the fields' values)
    instead of them; `helps` rewords a flag's help for this command."""
    flags = {("no_cache" if name == "cache" else name): (_cli_type(name), NO_CACHE if name == "cache" else
                                                          flag(name, (helps or {}).get(name)))
             for name in names}

    def wrap(command):
        hints = typing.get_type_hints(command)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name not in ("source", "options")]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
                 for name, (kind, default) in (LOADING | flags).items()]

        @functools.wraps(command)
        def run(**values):
            source = _model_values({name: values.pop(name) for name in LOADING})
            options = _option_values({name: values.pop(name) for name in flags})
            return command(source=source, options=options, **values)

        last = [p for p in own if p.name in ("workers", "json_out")]  # how to run and print: after the rest
        first = [p for p in own if p not in last]
        run.__signature__ = inspect.Signature(first + added + last)
        run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
        return run

    return wrap


def _cli_type(name: str) -> type:
    """The type a field's flag parses: the field's own, optional or not; tuples as comma-separated text."""
    kind = typing.get_type_hints(QuantizeOptions)[name]
    if isinstance(kind, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    return str if typing.get_origin(kind) is tuple else kind


def _option_values(flags: dict) -> dict:
    """The QuantizeOptions values of a command's flag values: the comma-separated flags parsed and --no-cache turned
    into `cache`."""
    values = {name: value for name, value in flags.items() if name in FIELDS}
    if "input_range" in values:
        values["input_range"] = _parse_range(values["input_range"])
    if "wbits_choices" in values:
        values["wbits_choices"] = _parse_choices(values["wbits_choices"])
    if "no_cache" in flags:
        values["cache"] = not flags["no_cache"]
    return values


def _model_values(flags: dict) -> dict:
    """The model and the keywords that say how to load it, from their flags."""
    return flags | {"input_shape": _parse_shape(flags["input_shape"])}


def _parse_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input-shape must be C,H,W with positive integers, got '{text}'")
    return shape


def _parse_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"--input-range must be LOW,HIGH, got '{text}'") from exc
    return low, high


def _parse_choices(text: str) -> tuple[int, ...]:
    try:
        choices = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        choices = ()
    if not choices:
        raise UsageError(f"--wbits-choices must be a comma-separated list of bit-widths from 2 to 8, got '{text}'")
    return choices
