"""What a user's model file holds, found by its content rather than its name: a torch.export archive, a TorchScript
archive (refused, with how to re-save it), a checkpoint or state_dict, or a pickled nn.Module. Pickles run code when
they load, so only plain tensors load unless the caller trusts the file."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from zeroquant.errors import ModelLoadError, brief
from zeroquant.zoo.exported import RESAVE_HINT, load_export

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


def read_model_file(path: Path, trust_pickle: bool) -> torch.export.ExportedProgram | nn.Module | dict:
    """The file's content: an ExportedProgram, a pickled nn.Module (with trust_pickle) or a state_dict's tensors."""
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a model file", "pass the file itself")
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}", "check the path")
    try:
        path.open("rb").close()
    except OSError as e:  # otherwise it would surface as "not a checkpoint" from torch.load
        raise ModelLoadError(f"cannot open model file {path}: {e.strerror}", "check its permissions") from e
    kind = _zip_kind(path)
    if kind == "torchscript":
        raise ModelLoadError(f"{path} is a TorchScript archive, which zeroquant cannot read", RESAVE_HINT)
    if kind == "export":
        return load_export(path)
    obj = torch_load(path, trust_pickle)
    return obj if isinstance(obj, nn.Module) else state_dict_of(obj, path)


def _zip_kind(path: Path) -> str | None:
    """'export' / 'torchscript' / None, from the member names (torch.save zips hold data.pkl but neither marker)."""
    try:  # is_zipfile itself raises on some damaged end records (e.g. a zip64 locator naming several disks)
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            members = {name.split("/", 1)[-1] for name in archive.namelist()}
    except Exception:  # a damaged directory (bad offsets, names that are not UTF-8): torch.load will say it
        return None
    if "archive_format" in members or any(m.startswith("models/") and m.endswith(".json") for m in members):
        return "export"
    if "constants.pkl" in members or any(m.startswith("code/") for m in members):
        return "torchscript"
    return None


def torch_load(path: Path, trust_pickle: bool) -> object:
    """torch.load with weights_only=True; a file that needs arbitrary unpickling loads only with trust_pickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise _unreadable(path, e) from e
        if not trust_pickle:
            raise ModelLoadError(
                f"{path} is a pickled Python object ({found.group(1)}), e.g. a whole nn.Module, not plain weights",
                "--trust-pickle loads it, which runs code from the file: use it only for files you trust",
            ) from e
    except Exception as e:
        raise _unreadable(path, e) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        hint = "the classes it needs must be importable"
        raise ModelLoadError(f"cannot unpickle {path}: {brief(e)}", hint) from e


def _unreadable(path: Path, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read model file {path}: not a torch.export archive, checkpoint or state_dict ({brief(error)})",
        "the file may be truncated or of another format",
    )


def state_dict_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict, or of one nested in a checkpoint dict; DataParallel's `module.` prefix removed."""
    if isinstance(obj, dict) and not _is_state_dict(obj):
        obj = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise ModelLoadError(
            f"{path} holds {what}, not a state_dict",
            f"expected tensors by parameter name, or a checkpoint dict with one of {', '.join(_NESTED_KEYS)}",
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
