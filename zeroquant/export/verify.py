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

from zeroquant.runtime import predict, session

INTEGER_KERNELS = {
    "QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearSigmoid", "QLinearConcat", "QLinearLeakyRelu", "QLinearSoftmax",
}


@dataclass
class Census:
    """Where the multiply-accumulates of conv/linear layers run once onnxruntime has optimised the graph."""

    integer_layers: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    integer_macs: int = 0
    total_macs: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def integer_mac_fraction(self) -> float:
        return self.integer_macs / self.total_macs if self.total_macs else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"integer_mac_fraction": self.integer_mac_fraction}


@dataclass
class Parity:
    """The ONNX model (onnxruntime, integer kernels) against the PyTorch simulation on the same images."""

    images: int
    top1_agreement: float  # percent
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    relative_max_diff: float  # max difference over the spread of the simulation's logits

    @property
    def diverged(self) -> bool:
        """Differences beyond rounding: a logit off by more than a tenth of the logits' spread. Top-1 agreement on
        distilled images is too strict a gate, since their logits are often nearly flat."""
        return not self.relative_max_diff <= 0.1

    def to_dict(self) -> dict:
        return asdict(self)


def census(model: onnx.ModelProto, layer_weights: dict[str, str], layer_macs: dict[str, int]) -> Census:
    """Find each layer's weight initializer in onnxruntime's optimised graph and see which kernel consumes it.

    layer_weights maps layer name -> its weight initializer name in `model`; layer_macs gives MACs per image.
    """
    with tempfile.TemporaryDirectory() as tmp:
        optimized = str(Path(tmp) / "optimized.onnx")
        session(model, optimized_path=optimized, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        graph = onnx.load(optimized).graph
    consumers: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    result = Census(op_counts=dict(sorted(counts.items())))
    for layer, weight in layer_weights.items():
        macs = layer_macs.get(layer, 0)
        result.total_macs += macs
        if any(op in INTEGER_KERNELS for op in consumers.get(weight, [])):
            result.integer_layers.append(layer)
            result.integer_macs += macs
        else:
            result.float_layers.append(layer)
    return result


def parity(model: onnx.ModelProto, simulation, images: torch.Tensor) -> Parity:
    onnx_logits = predict(session(model), images.numpy())
    with torch.no_grad():
        torch_logits = torch.cat([simulation(images[i : i + 64]) for i in range(0, len(images), 64)]).numpy()
    diff = np.abs(onnx_logits - torch_logits)
    agree = float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean() * 100)
    spread = float(torch_logits.max() - torch_logits.min()) or 1.0
    return Parity(len(images), agree, float(diff.max()), float(diff.mean()), float(diff.max()) / spread)


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
