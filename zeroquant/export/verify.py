"""Check an exported model before it is written: onnx.checker, a real onnxruntime session, parity with the
simulation, and a census of which conv/gemm layers onnxruntime runs in integer kernels."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from zeroquant.errors import ModelLoadError, VerificationError, first_line
from zeroquant.quant.sim import as_outputs
from zeroquant.runtime import run_all, session

INTEGER_KERNELS = {
    "QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearSigmoid", "QLinearConcat", "QLinearLeakyRelu", "QLinearSoftmax",
}

KEPT_FLOAT = {"Softmax": "kept float (quant/sim.py: FLOAT_READERS), its integer kernel QLinearSoftmax measured 6x "
                         "slower"}


@dataclass
class Census:
    """Where the multiply-accumulates of conv/linear layers and of products of two activations (attention's
    q K^T and attention x V) run once onnxruntime has optimised the graph."""

    integer_layers: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    integer_products: list[str] = field(default_factory=list)  # activation x activation MatMul nodes, by name
    float_products: list[str] = field(default_factory=list)
    integer_macs: int = 0
    total_macs: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)  # op type -> float islands (between DQ and Q)
    output_float_ops: dict[str, int] = field(default_factory=dict)  # op type -> float ops on the model's output

    @property
    def integer_mac_fraction(self) -> float:
        return self.integer_macs / self.total_macs if self.total_macs else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"integer_mac_fraction": self.integer_mac_fraction}


@dataclass
class Parity:
    """The ONNX model (onnxruntime, integer kernels) against the PyTorch simulation on the same images; with several
    outputs, the worst output's differences and the mean agreement (argmax over channels, at every position)."""

    images: int
    top1_agreement: float  # percent
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    relative_max_diff: float  # max difference over the spread of the simulation's values, worst output
    outputs: dict[str, dict] = field(default_factory=dict)  # per output name, when there are several

    @property
    def diverged(self) -> bool:
        """Differences beyond rounding: a logit off by more than a tenth of the logits' spread. Top-1 agreement on
        distilled images is too strict a gate, since their logits are often nearly flat."""
        return not self.relative_max_diff <= 0.1

    def to_dict(self) -> dict:
        return asdict(self)


def census(model: onnx.ModelProto, layer_weights: dict[str, str], layer_macs: dict[str, int],
           weight_values: dict[str, np.ndarray] | None = None) -> Census:
    """Find each layer's weight initializer in onnxruntime's optimised graph and see which kernel consumes it.

    layer_weights maps layer name -> its weight initializer name in `model`; layer_macs gives MACs per image. The
    exporter keeps one initializer for equal tensors (a BN's depthwise conv holds only +-127), so a name it dropped
    is found by the values (weight_values) instead.
    """
    with tempfile.TemporaryDirectory() as tmp:
        optimized = str(Path(tmp) / "optimized.onnx")
        session(model, optimized_path=optimized, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                disabled_optimizers=("ConstantSharing",))  # it would merge equal weights too
        graph = onnx.load(optimized).graph
    names = {init.name for init in model.graph.initializer}
    for layer, weight in layer_weights.items():
        if weight not in names and weight_values is not None and layer in weight_values:
            layer_weights = layer_weights | {layer: _same_values(model, weight_values[layer]) or weight}
    consumers: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    islands, at_output = float_ops(graph)
    result = Census(op_counts=dict(sorted(counts.items())), float_ops=islands, output_float_ops=at_output)
    for layer, weight in layer_weights.items():
        macs = layer_macs.get(layer, 0)
        result.total_macs += macs
        if any(op in INTEGER_KERNELS for op in consumers.get(weight, [])):
            result.integer_layers.append(layer)
            result.integer_macs += macs
        else:
            result.float_layers.append(layer)
    kernels = {node.name: node.op_type for node in graph.node}
    for name, macs in activation_products(model).items():
        kernel = next((op for fused, op in kernels.items() if fused == name or fused.startswith(f"{name}/")), None)
        result.total_macs += macs
        if kernel in INTEGER_KERNELS:
            result.integer_products.append(name)
            result.integer_macs += macs
        else:
            result.float_products.append(name)
    return result


def activation_products(model: onnx.ModelProto) -> dict[str, int]:
    """MACs per image of every MatMul node of `model` whose two inputs both vary with the input (no weight among
    them), by node name; onnxruntime keeps that name, with a suffix, on the kernel it fuses the node into."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]  # a symbolic batch counts as 1
              for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    constant = {init.name for init in graph.initializer}
    products = {}
    for node in graph.node:
        if all(name in constant for name in node.input if name):
            constant.update(node.output)
        elif node.op_type == "MatMul" and not constant & set(node.input) and node.input[0] in shapes and \
                node.output[0] in shapes:
            products[node.name] = int(np.prod(shapes[node.output[0]])) * shapes[node.input[0]][-1]
    return products


def _same_values(model: onnx.ModelProto, values: np.ndarray) -> str | None:
    for init in model.graph.initializer:
        if tuple(init.dims) == values.shape and init.data_type == onnx.TensorProto.INT8 and \
                np.array_equal(onnx.numpy_helper.to_array(init), values):
            return init.name
    return None


NOT_COMPUTE = {"QuantizeLinear", "DequantizeLinear", "Shape", "Size"}
FLOAT_RESULT_KERNELS = {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}  # integer products, float output


def _writes_float(node: onnx.NodeProto) -> bool:
    """An integer kernel whose output is float: what reads it runs in float (a QGemm without an output scale)."""
    if node.op_type == "QGemm":
        return len(node.input) < 8 or not node.input[7]
    return node.op_type in FLOAT_RESULT_KERNELS


def float_ops(graph: onnx.GraphProto) -> tuple[dict[str, int], dict[str, int]]:
    """Op types of the nodes that compute on float activations (the model input, a DequantizeLinear of an
    activation, an integer kernel's float output, or another such node's output) in onnxruntime's optimised graph:
    the float islands, and apart from them the ops that only work on what the model outputs (e.g. an upsampling of
    the last layer's float output)."""
    constants = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    floating = {i.name for i in graph.input if i.name not in constants}
    islands: dict[str, int] = {}
    at_output: dict[str, int] = {}
    for node in graph.node:  # topologically sorted
        if (node.op_type == "DequantizeLinear" and node.input[0] not in constants) or _writes_float(node):
            floating.update(node.output)
        elif node.op_type not in NOT_COMPUTE and any(name in floating for name in node.input):
            found = at_output if set(node.output) <= outputs else islands
            found[node.op_type] = found.get(node.op_type, 0) + 1
            floating.update(node.output)
    return dict(sorted(islands.items())), dict(sorted(at_output.items()))


def parity(model: onnx.ModelProto, simulation, images: torch.Tensor, names: list[str]) -> Parity:
    """The outputs of onnxruntime against the simulation's; a model onnxruntime refuses is a VerificationError."""
    try:
        loaded = session(model)
    except ModelLoadError as exc:
        raise VerificationError(f"the exported model failed verification: {exc.message}") from exc
    onnx_outputs = run_all(loaded, images.numpy())
    with torch.no_grad():
        chunks = [as_outputs(simulation(chunk)) for chunk in images.split(64)]
    sim_outputs = [torch.cat(parts).numpy() for parts in zip(*chunks)]
    rows = {}
    for name, ours, expected in zip(names, onnx_outputs, sim_outputs):
        diff = np.abs(ours - expected)
        spread = float(expected.max() - expected.min()) or 1.0
        rows[name] = {"top1_agreement": float((ours.argmax(1) == expected.argmax(1)).mean() * 100),
                      "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                      "relative_max_diff": float(diff.max()) / spread}
    values = list(rows.values())
    return Parity(len(images), float(np.mean([r["top1_agreement"] for r in values])),
                  max(r["max_abs_diff"] for r in values), float(np.mean([r["mean_abs_diff"] for r in values])),
                  max(r["relative_max_diff"] for r in values), rows if len(rows) > 1 else {})


def check(model: onnx.ModelProto) -> None:
    """onnx's checker; what it finds is a VerificationError (anything else it raises is a bug of ours)."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(f"the exported model failed onnx's checker: {first_line(exc)}") from exc
