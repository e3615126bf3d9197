"""onnxruntime on the CPU: one way to open a session and one way to run images through it, for every stage that
runs an ONNX model (verification before writing, evaluation and benchmarks after)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from zeroquant.cpu import WEIGHT_GRID, grid_warning
from zeroquant.errors import ModelLoadError, UsageError, first_line


def session(model: onnx.ModelProto | bytes | str | Path, threads: int | None = None, spinning: bool = True,
            options: ort.SessionOptions | None = None, optimized_path: str | Path | None = None,
            level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            disabled_optimizers: tuple[str, ...] = ()) -> ort.InferenceSession:
    """A CPU session on a model in memory or a file. spinning=False lets idle intra-op workers sleep (for sessions
    timed interleaved); optimized_path saves onnxruntime's optimised graph (to see which kernels it chose)."""
    options = options or ort.SessionOptions()
    options.log_severity_level = 3
    if options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
        options.graph_optimization_level = level
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        if not Path(model).is_file():
            raise ModelLoadError(f"ONNX model not found: {model}")
        model = str(model)
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled_optimizers) or None)
    except Exception as e:  # onnxruntime raises its own (unexported) exception types
        raise ModelLoadError(f"onnxruntime cannot load {'the model' if isinstance(model, bytes) else model}: "
                             f"{first_line(e)}") from e


def image_input(session: ort.InferenceSession) -> tuple[str, list]:
    """Name and shape of the model's one float input; a clear error for models that take anything else."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        expects = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in inputs)
        raise UsageError(f"model must take one float tensor, it expects {expects}")
    return inputs[0].name, inputs[0].shape


def run_all(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    """Every output for NCHW images, in the model's output order. A model exported with a fixed batch size is fed
    that many at a time (the last batch zero-padded)."""
    name, shape = image_input(session)
    if len(shape) != images.ndim or any(isinstance(d, int) and d != s for d, s in zip(shape[1:], images.shape[1:])):
        raise UsageError(f"model input '{name}' expects shape {shape}, images have shape {list(images.shape)}")
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    step = fixed or batch_size
    chunks = []
    for start in range(0, len(images), step):
        batch = np.ascontiguousarray(images[start : start + step], dtype=np.float32)
        n = len(batch)
        if fixed and n < fixed:
            batch = np.concatenate([batch, np.zeros((fixed - n, *batch.shape[1:]), np.float32)])
        chunks.append([out[:n] for out in session.run(None, {name: batch})])
    return [np.concatenate(parts).astype(np.float32, copy=False) for parts in zip(*chunks)]


def predict(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The first output (a classifier's logits) for NCHW images."""
    return run_all(session, images, batch_size)[0]


def weight_grid_warning(path: str | Path) -> str | None:
    """grid_warning() for an ONNX file, by the weight grid zeroquant wrote into its metadata (None for other files)."""
    props = {p.key: p.value for p in onnx.load_model(str(path), load_external_data=False).metadata_props}
    return grid_warning(props.get(WEIGHT_GRID))
