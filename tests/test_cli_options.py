"""One place for every option's default: typer passes every flag's value to QuantizeOptions, so a CLI default that
differs from the field's silently overrides it. Every command's flags are checked against QuantizeOptions here."""

import dataclasses

import pytest
import typer.main

from zeroquant.cli import bench, evaluate, inspect, pareto, quantize, zoo  # noqa: F401 (they add the commands)
from zeroquant.cli.app import app
from zeroquant.options import QuantizeOptions

DEFAULTS = QuantizeOptions()
FIELDS = {f.name for f in dataclasses.fields(QuantizeOptions)}


def commands() -> dict:
    return typer.main.get_command(app).commands


def cli_value(name: str, default):
    """The QuantizeOptions value a flag's default becomes (the CLI's spellings of two fields differ)."""
    if name == "wbits_choices":
        return tuple(int(v) for v in default.split(","))
    return default


@pytest.mark.parametrize("command", ["quantize", "pareto", "inspect", "distill"])
def test_every_flag_named_after_an_option_has_its_default(command):
    params = {p.name: p for p in commands()[command].params}
    checked = {name for name in params if name in FIELDS}
    assert len(checked) >= 7, sorted(params)  # the command does take QuantizeOptions flags
    differ = {name: (params[name].default, getattr(DEFAULTS, name)) for name in checked
              if params[name].default is not None and cli_value(name, params[name].default) != getattr(DEFAULTS, name)}
    assert not differ, differ
    if "no_cache" in params:
        assert params["no_cache"].default is (not DEFAULTS.cache)
