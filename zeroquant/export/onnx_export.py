"""Write a graph module as ONNX through torch.export + torch.onnx, with a dynamic batch and stable names."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from zeroquant.errors import OutputError

OPSET = 21  # QuantizeLinear/DequantizeLinear with int4 types; onnxruntime fuses QDQ at this opset
INPUT_NAME, OUTPUT_NAME, BATCH = "input", "logits", "batch"


def to_onnx(module: torch.nn.Module, input_shape: tuple[int, int, int]) -> onnx.ModelProto:
    """Export with one float32 NCHW input of dynamic batch and the logits as the only output."""
    example = torch.zeros(2, *input_shape)
    with torch.no_grad():
        exported = torch.export.export(module, (example,), dynamic_shapes=({0: Dim(BATCH, min=1)},))
    with contextlib.redirect_stdout(io.StringIO()):  # torch.onnx narrates its steps on stdout; results go there
        program = torch.onnx.export(exported, dynamo=True, opset_version=OPSET, verbose=False)
    model = program.model_proto
    _strip_metadata(model)
    _rename_value(model, model.graph.input[0].name, INPUT_NAME)
    _rename_value(model, model.graph.output[0].name, OUTPUT_NAME)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH
    model.producer_name, model.producer_version = "zeroquant", _version()
    return model


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node provenance (stack traces, source paths): it is most of a small model's bytes
    and would make the file depend on where zeroquant is installed."""
    graph = model.graph
    for item in list(graph.node) + list(graph.value_info) + list(graph.initializer) + list(graph.input) + list(
            graph.output):
        del item.metadata_props[:]
        item.doc_string = ""
    del graph.metadata_props[:]
    del model.metadata_props[:]


def _version() -> str:
    from importlib.metadata import version

    return version("zeroquant")


def _rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    if old == new:
        return
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write beside the target and rename, so an interrupted or failed write never leaves a partial file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}", "create it or choose another -o path")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror}") from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; outputs get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
        raise
