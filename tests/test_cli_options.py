"""One place for every option's default and help: typer passes every flag's value to QuantizeOptions, so a CLI default
that differs from the field's would silently override it. The flags are made from QuantizeOptions
(zeroquant/cli/options.py); every command's flags are checked against it here."""

import dataclasses

import pytest
import typer.main

from zeroquant.cli.app import app
from zeroquant.options import QuantizeOptions

DEFAULTS = QuantizeOptions()
FIELDS = {f.name: f for f in dataclasses.fields(QuantizeOptions)}


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


def test_quantize_has_a_flag_for_every_option_but_the_api_only_one():
    """A field added to QuantizeOptions reaches the CLI (with its help) or is named here as API-only."""
    params = {p.name: p for p in commands()["quantize"].params}
    missing = set(FIELDS) - set(params) - {"cache", "layer_bits"}  # cache is --no-cache; layer_bits is API-only
    assert not missing, missing
    for name in set(FIELDS) & set(params):
        assert params[name].help == FIELDS[name].metadata["help"], name
