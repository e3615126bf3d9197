"""Where an ONNX model's work runs once onnxruntime has optimised it: the op tables and the census of which
conv/linear layers and activation products run in integer kernels and which ops stay float. The export checks its
own file with it (with zeroquant's layer names); `bench` and the benchmarks census any file (kernel_census)."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from zeroquant.runtime import session

INTEGER_KERNELS = {
    "QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearSigmoid", "QLinearConcat", "QLinearLeakyRelu", "QLinearSoftmax",
}

KEPT_FLOAT = {"Softmax": "kept float (quant/sim.py: FLOAT_READERS), its integer kernel QLinearSoftmax measured 6x "
                         "slower"}


FLOAT_KERNELS = {"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "ConvInteger": 1, "QLinearConv": 3,
                "Gemm": 1, "MatMul": 1, "MatMulInteger": 1, "QLinearMatMul": 3, "QGemm": 3}
CONV_LIKE = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"}
CONV_KERNELS = CONV_LIKE | {"FusedConv", "NhwcFusedConv"}  # convolutions as onnxruntime's optimised graph names them


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


def kernel_census(path: str | Path) -> dict:
    """census() for a file without zeroquant's layer names: every conv/gemm-like node whose weight is an
    initializer (directly or through a DequantizeLinear) is a layer, named by that initializer.

    MACs per image come from ONNX shape inference; a layer whose output shape is unknown counts its weight size.
    Adds op-type counts of integer kernels and of float conv/gemm kernels in onnxruntime's optimised graph.
    """
    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.value_info) + list(inferred.output)}
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    macs = {}
    for node in model.graph.node:
        index = WEIGHT_INPUT.get(node.op_type, len(node.input))
        weight = dequantized.get(node.input[index], node.input[index]) if index < len(node.input) else None
        if weight not in sizes:  # no weight, or activation x activation
            continue
        out = shapes.get(node.output[0], [])
        positions = out[2:] if node.op_type in CONV_LIKE else out[1:-1]
        macs[weight] = sizes[weight] * int(np.prod([d or 1 for d in positions]))
    result = census(model, {w: w for w in macs}, macs)
    return result.to_dict() | {
        "integer_kernels": {op: n for op, n in result.op_counts.items() if op in INTEGER_KERNELS},
        "float_kernels": {op: n for op, n in result.op_counts.items() if op in FLOAT_KERNELS},
    }
