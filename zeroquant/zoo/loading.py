"""Turn a model source (`zoo:NAME` or a file) into an eval-mode CPU module, detecting the file kind by content."""

from __future__ import annotations

import importlib
import itertools
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zeroquant.errors import ModelLoadError, UnsupportedModelError, UsageError, first_line
from zeroquant.graph.constants import depends_on_input
from zeroquant.zoo.architectures import ARCHITECTURES
from zeroquant.zoo.registry import Preprocessing, ZooEntry, zoo_entries, zoo_entry

_RESAVE_HINT = ("re-save it with torch.export.save(torch.export.export(model.eval(), (torch.randn(2, C, H, W),), "
                "dynamic_shapes=({0: torch.export.Dim('batch')},)), path)")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
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
        state = _state_dict_of(_torch_load(path, trust_pickle), path)
        loaded = _from_state_dict(state, path, entry, entry.name)
    else:
        if weights is not None:
            raise UsageError("--weights applies to zoo:NAME sources only", "pass the weights file as the model instead")
        entry = zoo_entry(arch) if arch is not None else None
        loaded = _load_file(Path(source), entry, trust_pickle)
    _check_finite(loaded.module)
    return loaded


def _load_file(path: Path, entry: ZooEntry | None, trust_pickle: bool) -> LoadedModel:
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
        raise ModelLoadError(f"{path} is a TorchScript archive, which zeroquant cannot read", _RESAVE_HINT)
    if kind == "export":
        if entry is not None:
            raise UsageError(f"--arch given for torch.export archive {path}", "--arch applies to state_dict files only")
        return _from_export(path)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        if entry is not None:
            raise UsageError(f"--arch given for pickled module {path}", "--arch applies to state_dict files only")
        return LoadedModel(obj.cpu().eval(), path.stem, None, None, None)
    state = _state_dict_of(obj, path)
    if entry is None:
        raise UsageError(
            f"{path} holds only weights (a state_dict): pass --arch NAME to say which model they belong to",
            f"known: {', '.join(sorted(zoo_entries()))}",
        )
    return _from_state_dict(state, path, entry, path.stem)


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


class _Muted(logging.Filter):
    """Keeps a logger off stderr, holding on to the exceptions it would have printed with their tracebacks."""

    def __init__(self):
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            self.errors.append(record.exc_info[1])
        return False


def _from_export(path: Path) -> LoadedModel:
    # torch.export.load logs the real cause of a failure (with a traceback) and then raises a vaguer error; and
    # given a path, it warns unless the name ends in .pt2, so it gets an open file.
    muted, logger = _Muted(), logging.getLogger("torch.export")
    logger.addFilter(muted)
    try:
        with path.open("rb") as f:
            program = torch.export.load(f)
    except Exception as e:
        cause = _one_line(muted.errors[0] if muted.errors else e)
        raise ModelLoadError(f"cannot load torch.export archive {path}: {cause}", _RESAVE_HINT) from e
    finally:
        logger.removeFilter(muted)
    return _from_program(program, path.stem)


def _from_program(program: torch.export.ExportedProgram, name: str) -> LoadedModel:
    module = program.module()  # parameters are get_attr nodes here, not inputs as in program.graph
    training = _training_nodes(module.graph)
    if training:
        raise UnsupportedModelError(
            f"{name} was exported in training mode (node {training[0]} uses batch statistics or dropout)",
            "call model.eval() before torch.export.export",
        )
    # module() makes train()/eval() raise; the graph is fixed in eval form (checked above), so the flag-only
    # nn.Module versions are safe and let callers treat it like any other module.
    del module.train, module.eval
    _check_finite(module)
    return LoadedModel(module.eval(), name, _example_shape(program), None, program)


def _training_nodes(graph: torch.fx.Graph) -> list[str]:
    """Ops called with training=True (batch_norm, dropout) on the input's data: an exported graph cannot be switched
    to eval(). A batch_norm of parameters alone (weight standardisation) is no training-mode layer."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or \
                not depends_on_input(node):
            continue
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.name in ("training", "train"):
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name, arg.default_value)
                if value is True:
                    found.append(node.name)
    return found


def _example_shape(program: torch.export.ExportedProgram) -> tuple[int, int, int] | None:
    """C,H,W of the single image input the program was exported with, when it has one with static sizes."""
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        return None
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0])
    value = node.meta.get("val")
    shape = tuple(getattr(value, "shape", ()))[1:]
    return tuple(shape) if len(shape) == 3 and all(isinstance(s, int) for s in shape) else None


def _torch_load(path: Path, trust_pickle: bool) -> object:
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
        raise ModelLoadError(f"cannot unpickle {path}: {_one_line(e)}", hint) from e


def _unreadable(path: Path, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read model file {path}: not a torch.export archive, checkpoint or state_dict ({_one_line(error)})",
        "the file may be truncated or of another format",
    )


def _state_dict_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
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


def _from_state_dict(state: dict[str, torch.Tensor], path: Path, entry: ZooEntry, name: str) -> LoadedModel:
    try:
        model = ARCHITECTURES[entry.arch](**entry.arch_args)
    except Exception as e:
        message = f"cannot build '{entry.arch}' for zoo model {entry.name}: {_one_line(e)}"
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
            problems = [_one_line(e)]
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


def _one_line(error: BaseException) -> str:
    """The first sentence of the first line: library errors go on to paragraphs of advice that is not ours."""
    return f"{type(error).__name__}: {re.split(r'(?<=[.]) ', first_line(error))[0]}"[:200]
