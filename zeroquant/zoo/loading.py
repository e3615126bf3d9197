"""Turn a model source (an nn.Module, a torch.export program, `zoo:NAME` or a file) into an eval-mode CPU module
with what is known about its input; what a file holds is model_files' business, torch.export's exported's."""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zeroquant.errors import ModelLoadError, UnsupportedModelError, UsageError, brief
from zeroquant.zoo.architectures import ARCHITECTURES
from zeroquant.zoo.exported import program_module
from zeroquant.zoo.model_files import read_model_file, state_dict_of, torch_load
from zeroquant.zoo.registry import Preprocessing, ZooEntry, zoo_entries, zoo_entry

_SHOW = 3  # how many offending keys a mismatch message names


@dataclass
class LoadedModel:
    module: nn.Module  # on CPU; a caller's nn.Module as given (capture runs it in eval mode and puts its modes back)
    name: str  # zoo name or file stem, for reports
    input_shape: tuple[int, int, int] | None  # C,H,W when known
    preprocessing: Preprocessing | None  # from the zoo entry, when known
    exported: torch.export.ExportedProgram | None  # set when the file was a torch.export archive

    def shape(self, given: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
        """The C,H,W to use: `given` (--input-shape) over the model's own; an error when neither is known."""
        shape = tuple(given or self.input_shape or ())
        if not shape:
            raise UsageError("the input shape is unknown for this model", "pass --input-shape C,H,W")
        return shape


def resolve_model(model, arch: str | None = None, weights: str | None = None,
                  trust_pickle: bool = False) -> LoadedModel:
    """What the Python API accepts as a model: an nn.Module, a torch.export ExportedProgram, a path or "zoo:NAME"
    (read as the CLI reads it), or an already loaded model."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model), arch, weights, trust_pickle)
    if arch is not None or weights is not None:
        raise UsageError("arch and weights apply to model files only, not to a model object")
    if isinstance(model, torch.export.ExportedProgram):
        return _from_program(model, type(model).__name__)
    if isinstance(model, nn.Module):
        _check_finite(model)
        return LoadedModel(model, type(model).__name__, None, None, None)
    raise UsageError(f"cannot quantize a {type(model).__name__}",
                     "pass an nn.Module, a torch.export.ExportedProgram, a model file path or 'zoo:NAME'")


def load_model(
    source: str, arch: str | None = None, weights: str | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """Load `zoo:NAME` (weights from `weights` or the zoo entry) or a model file (export archive, state_dict + `arch`,
    or with `trust_pickle` a pickled nn.Module); reject non-finite weights."""
    if source.startswith("zoo:"):
        entry = zoo_entry(source.removeprefix("zoo:"))
        if arch not in (None, entry.name):
            raise UsageError(f"--arch {arch} contradicts {source}", "--arch applies to state_dict files only")
        path = _zoo_weights(entry, weights)
        state = state_dict_of(torch_load(path, trust_pickle), path)
        loaded = _from_state_dict(state, path, entry, entry.name)
    else:
        if weights is not None:
            raise UsageError("--weights applies to zoo:NAME sources only", "pass the weights file as the model instead")
        entry = zoo_entry(arch) if arch is not None else None
        loaded = _load_file(Path(source), entry, trust_pickle)
    _check_finite(loaded.module)
    return loaded


def _load_file(path: Path, entry: ZooEntry | None, trust_pickle: bool) -> LoadedModel:
    content = read_model_file(path, trust_pickle)
    if not isinstance(content, dict) and entry is not None:
        kind = "torch.export archive" if isinstance(content, torch.export.ExportedProgram) else "pickled module"
        raise UsageError(f"--arch given for {kind} {path}", "--arch applies to state_dict files only")
    if isinstance(content, torch.export.ExportedProgram):
        return _from_program(content, path.stem)
    if isinstance(content, nn.Module):
        return LoadedModel(content.cpu().eval(), path.stem, None, None, None)
    if entry is None:
        raise UsageError(
            f"{path} holds only weights (a state_dict): pass --arch NAME to say which model they belong to",
            f"known: {', '.join(sorted(zoo_entries()))}",
        )
    return _from_state_dict(content, path, entry, path.stem)


def _from_program(program: torch.export.ExportedProgram, name: str) -> LoadedModel:
    module, shape = program_module(program, name)
    _check_finite(module)
    return LoadedModel(module, name, shape, None, program)


def _from_state_dict(state: dict[str, torch.Tensor], path: Path, entry: ZooEntry, name: str) -> LoadedModel:
    try:
        model = ARCHITECTURES[entry.arch](**entry.arch_args)
    except Exception as e:
        message = f"cannot build '{entry.arch}' for zoo model {entry.name}: {brief(e)}"
        raise ModelLoadError(message, "check models.yaml") from e
    expected = model.state_dict()
    # BatchNorm fills in num_batches_tracked itself for checkpoints that predate it, so it is never "missing".
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(v.shape)} in file vs {tuple(expected[k].shape)} in model"
              for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{label}: {_first(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)) if keys]
    if not problems:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            problems = [brief(e)]
    if problems:
        message = f"weights in {path} do not fit {entry.name}: {'; '.join(problems)}"
        raise ModelLoadError(message, "check --arch / --weights")
    return LoadedModel(model.eval(), name, entry.input_shape, entry.preprocessing, None)


def _first(items: list[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def _zoo_weights(entry: ZooEntry, weights: str | None) -> Path:
    """The weights file: --weights if given, else the entry's `path` or the file a `package` callable names."""
    if weights is not None:
        path = Path(weights)
    elif entry.weights is None:
        raise UsageError(f"zoo model {entry.name} ships no weights", "pass --weights FILE with its state_dict")
    elif "path" in entry.weights:
        path = entry.resolve(entry.weights["path"])
    else:
        module, attrs = entry.weights["package"].split(":")
        try:
            target = importlib.import_module(module)
        except ImportError as e:
            raise ModelLoadError(f"weights package '{module}' for {entry.name} is not installed",
                                 "pip install 'zeroquant[zoo]', or pass --weights FILE") from e
        path = Path(_call(target, attrs))
    if not path.is_file():
        raise ModelLoadError(f"weights file for {entry.name} not found: {path}", "check the path or --weights FILE")
    return path


def _call(target: object, attrs: str) -> object:
    for attr in attrs.split("."):
        target = getattr(target, attr)
    return target()


def _check_finite(module: nn.Module) -> None:
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UnsupportedModelError(f"weights are not finite: {name} holds NaN or inf", "the model file is broken")
