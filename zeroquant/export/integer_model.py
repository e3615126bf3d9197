"""The integer model: the QuantSim with every fake-quant module swapped for its storage form (int8 weights, int32
biases, uint8 Q/DQ pairs), written with the quantized_decomposed ops that torch.onnx lowers to QuantizeLinear /
DequantizeLinear. torch.export of it therefore yields integer initializers directly, and onnxruntime fuses the
DQ -> op -> Q patterns into its integer kernels.

Three exact rewrites keep ops out of float that would otherwise stop that fusion:
- a ReLU/ReLU6 before a quantizer becomes a Clip of the uint8 tensor to the clamp's integer bounds (or nothing, where
  the grid already starts at 0 and ends below the clamp);
- hardsigmoid(x) = clamp(x + 3, 0, 6) / 6 of a quantized x becomes a Clip of x's uint8 tensor read with a sixth of
  its scale where x's grid holds -3 (quant/quantizers.py, GateQuantizer), so hardswish is one Clip and one
  QLinearMul; elsewhere x + 3 quantized with six times the scale the next op reads it with (one QLinearAdd);
- a Python number or one-element parameter in add / sub / mul / div becomes a quantized constant, so onnxruntime
  sees DQ on both inputs and fuses QLinearAdd / QLinearMul (x - c and x / c are written x + (-c) and x * (1 / c)).
"""

from __future__ import annotations

import copy

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn

from zeroquant.graph.ops import COMMUTATIVE, aten, constant_value, free_attribute, relu_upper_bound, uint8_step
from zeroquant.quant.quantizers import INT32_MAX, ActivationQuantizer, GateQuantizer, QuantizedLayer, steps_to_three
from zeroquant.quant.sim import QuantSim, clamp_quantizers

qd = torch.ops.quantized_decomposed
SCALAR_OPS = {aten.add.Tensor: (aten.add.Tensor, lambda c: c), aten.add_.Tensor: (aten.add.Tensor, lambda c: c),
              aten.sub.Tensor: (aten.add.Tensor, lambda c: -c), aten.mul.Tensor: (aten.mul.Tensor, lambda c: c),
              aten.mul_.Tensor: (aten.mul.Tensor, lambda c: c), aten.div.Tensor: (aten.mul.Tensor, lambda c: 1 / c)}


class QuantizeDequantize(nn.Module):
    """uint8 QuantizeLinear -> (Clip) -> DequantizeLinear with the quantizer's zero point.

    The Clip on the uint8 tensor restricts it to [low, high]: the b-bit grid [0, 2^b - 1] below 8 bits, and a
    ReLU/ReLU6's bounds in integer units. onnxruntime keeps it in the integer domain between two integer kernels,
    whereas a float Clip would break their fusion. `quantize_scale` differs from the dequantize scale only where an
    affine op is folded into the pair (hardsigmoid as x + 3)."""

    def __init__(self, quantizer: ActivationQuantizer, low: int = 0, high: int = 255,
                 quantize_scale: float | None = None):
        super().__init__()
        self.scale, self.zero_point = quantizer.grid()
        self.quantize_scale = self.scale if quantize_scale is None else quantize_scale
        self.low, self.high = max(low, 0), min(high, 2**quantizer.bits - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = qd.quantize_per_tensor(x, self.quantize_scale, self.zero_point, 0, 255, torch.uint8)
        if self.low > 0 or self.high < 255:
            q = torch.clamp(q, self.low, self.high)
        return qd.dequantize_per_tensor(q, self.scale, self.zero_point, 0, 255, torch.uint8)


class HardsigmoidGate(nn.Module):
    """hardsigmoid(x) = clamp(x + 3, 0, 6) / 6 for x on a grid (scale s, zero point z) holding -3 = -k s: the uint8
    tensor clipped to [z - k, z + k] and read with zero point z - k and scale s / 6 (the GateQuantizer's grid, so
    onnxruntime drops the Q/DQ pair after it). Exact, and a Clip instead of a requantization: hardswish of a
    16 x 112 x 112 uint8 tensor took 57 us as Clip + QLinearMul against 69 us as QLinearAdd + QLinearMul (1 thread,
    AVX-512 VNNI)."""

    def __init__(self, source: ActivationQuantizer):
        super().__init__()
        (self.scale, self.zero_point), self.steps = source.grid(), steps_to_three(source)
        self.high = min(self.zero_point + self.steps, 2**source.bits - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = qd.quantize_per_tensor(x, self.scale, self.zero_point, 0, 255, torch.uint8)
        q = torch.clamp(q, self.zero_point - self.steps, self.high)
        return qd.dequantize_per_tensor(q, self.scale / 6, self.zero_point - self.steps, 0, 255, torch.uint8)


class QuantizedConstant(nn.Module):
    """A scalar held exactly as uint8 255 (or 0 with zero point 255, for a negative one) on the grid |c| / 255, read
    through DequantizeLinear like any quantized activation."""

    def __init__(self, value: float):
        super().__init__()
        self.scale = max(abs(value), 1e-12) / 255
        self.zero_point = 255 if value < 0 else 0
        self.register_buffer("q", torch.tensor([0 if value < 0 else 255], dtype=torch.uint8))

    def forward(self) -> torch.Tensor:
        return qd.dequantize_per_tensor(self.q, self.scale, self.zero_point, 0, 255, torch.uint8)


class QuantizedTensorConstant(nn.Module):
    """A constant tensor whose values a uint8 grid (zero point 0) holds exactly, read through DequantizeLinear, so
    that onnxruntime fuses the op reading it (a pool's count factor in QLinearMul)."""

    def __init__(self, value: torch.Tensor, step: float):
        super().__init__()
        self.scale = step
        self.register_buffer("q", (value.double() / step).round().to(torch.uint8))

    def forward(self) -> torch.Tensor:
        return qd.dequantize_per_tensor(self.q, self.scale, 0, 0, 255, torch.uint8)


class IntegerLayer(nn.Module):
    """conv2d/linear whose weights are an int8 tensor and whose bias an int32 tensor, both dequantized per channel.

    A linear on tokens ([batch, tokens, C]) is applied to them flattened to [batch * tokens, C]: torch.onnx writes
    it as Gemm, which onnxruntime fuses into QGemm (int32 bias, uint8 output) and moves the reshapes onto the uint8
    tensors; a MatMul on 3-D input ran as MatMulIntegerToFloat with a float bias Add and a requantization."""

    def __init__(self, layer: QuantizedLayer):
        super().__init__()
        self.kind, self.conv_args, self.qmax = layer.kind, layer.conv_args, layer.qmax
        self.register_buffer("weight", layer.integer_weight().to(torch.int8))
        self.register_buffer("weight_scale", layer.weight_scale.clone())
        self.register_buffer("zero_point", torch.zeros(len(layer.weight_scale), dtype=torch.int64))
        if layer.input_scale is None:  # input not quantized: the bias stays float (this layer runs in float)
            self.register_buffer("bias", layer.corrected_bias)
            self.bias_scale = None
        else:
            bias_scale = layer.input_scale * layer.weight_scale
            self.register_buffer("bias", (layer.quantized_bias / bias_scale).round().to(torch.int32))
            self.register_buffer("bias_scale", bias_scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = qd.dequantize_per_channel(self.weight, self.weight_scale, self.zero_point, 0, -self.qmax, self.qmax,
                                           torch.int8)
        bias = self.bias
        if self.bias_scale is not None:
            bias = qd.dequantize_per_channel(bias, self.bias_scale, self.zero_point, 0, -INT32_MAX, INT32_MAX,
                                             torch.int32)
        if self.kind == "conv":
            return F.conv2d(x, weight, bias, *self.conv_args)
        if x.dim() > 2:
            return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], -1)
        return F.linear(x, weight, bias)


def integer_model(sim: QuantSim) -> torch.fx.GraphModule:
    """A copy of the simulation's graph in storage form, computing what the simulation computes."""
    gm = copy.deepcopy(sim.graph_module)
    for name, quantizer in sim.activations.items():
        setattr(gm, name, QuantizeDequantize(quantizer) if quantizer.enabled else nn.Identity())
    for name, layer in sim.layers.items():
        if layer.enabled:
            setattr(gm, name, IntegerLayer(layer))
    _hardsigmoids(gm, sim)  # first: it reads the quantizers by name, before the clamps give some a module of its own
    _integer_clamps(gm, sim)
    _quantized_constants(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _own_module(gm: torch.fx.GraphModule, call: torch.fx.Node, module: nn.Module) -> None:
    """Give one call of a (possibly shared) quantizer a module of its own."""
    name = free_attribute(gm, f"{call.target}_at_{call.name}")
    gm.add_submodule(name, module)
    call.target = name


def _integer_clamps(gm: torch.fx.GraphModule, sim: QuantSim) -> None:
    """quantize(clamp(x, 0, u)) = clip(quantize(x), zp, zp + round(u / s)): the clamp moves onto the uint8 tensor."""
    for clamp, quantizer in clamp_quantizers(gm.graph, sim.activations):
        call = next(iter(clamp.users))
        upper = relu_upper_bound(clamp)
        high = 255 if upper == float("inf") else quantizer.zero_point + round(upper / quantizer.scale)
        _own_module(gm, call, QuantizeDequantize(quantizer, quantizer.zero_point, high))
        clamp.replace_all_uses_with(clamp.args[0])
        gm.graph.erase_node(clamp)


def _hardsigmoids(gm: torch.fx.GraphModule, sim: QuantSim) -> None:
    """A hardsigmoid before its quantizer becomes a HardsigmoidGate where that GateQuantizer is tied to x's grid;
    elsewhere x + 3 quantized with scale 6 s, read on the [0, 1] grid s (zero point 0): one QLinearAdd."""
    for node in list(gm.graph.nodes):
        users = list(node.users)
        if node.target != aten.hardsigmoid.default or len(users) != 1 or users[0].op != "call_module":
            continue
        quantizer = sim.activations.get(users[0].target)
        if quantizer is None or not quantizer.enabled:
            continue
        if isinstance(quantizer, GateQuantizer) and quantizer.tied() is not None:
            name = free_attribute(gm, f"gate_{node.name}")
            gm.add_submodule(name, HardsigmoidGate(quantizer.sources[0]))
            node.op, node.target = "call_module", name
        elif quantizer.zero_point == 0:
            with gm.graph.inserting_before(node):
                shifted = gm.graph.call_function(aten.add.Tensor, (node.args[0], 3.0))
            shifted.meta = dict(node.meta)
            node.replace_all_uses_with(shifted)
            gm.graph.erase_node(node)
            top = round(1 / quantizer.scale)  # hardsigmoid ends at 1: the grid may reach beyond
            _own_module(gm, users[0], QuantizeDequantize(quantizer, high=top, quantize_scale=6 * quantizer.scale))


def _scalar_constant(gm: torch.fx.GraphModule, arg) -> float | None:
    """The value of a Python number, or of a one-element float parameter (a learnable scale or offset, as in
    HGNetV2's affine blocks), that an elementwise op reads; None for anything else."""
    value = constant_value(gm, arg)
    if isinstance(value, torch.Tensor):
        return float(value) if value.is_floating_point() and value.numel() == 1 and value.dim() <= 1 else None
    return value


def _constant_before(gm: torch.fx.GraphModule, node: torch.fx.Node, module: nn.Module) -> torch.fx.Node:
    """A call of `module` (a quantized constant, which takes no input) added just before `node`, for it to read."""
    name = free_attribute(gm, f"constant_{node.name}")
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        return gm.graph.call_module(name, ())


def _grid_constant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """x * C for a float tensor constant C on a uint8 grid: C read through DequantizeLinear."""
    for index, arg in enumerate(node.args[:2]):
        value = constant_value(gm, arg)
        step = uint8_step(value) if isinstance(value, torch.Tensor) and value.numel() > 1 else None
        if step is None:
            continue
        constant = _constant_before(gm, node, QuantizedTensorConstant(value, step))
        node.args = tuple(constant if i == index else a for i, a in enumerate(node.args))
        return


def _quantized_constants(gm: torch.fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SCALAR_OPS or len(node.args) != 2 or node.kwargs:
            continue
        tensor, value = node.args[0], _scalar_constant(gm, node.args[1])
        if value is None and node.target in COMMUTATIVE:  # c * x, c + x
            tensor, value = node.args[1], _scalar_constant(gm, node.args[0])
        if value is None and node.target in (aten.mul.Tensor, aten.mul_.Tensor):
            _grid_constant(gm, node)
        if value is None or not isinstance(tensor, torch.fx.Node) or _scalar_constant(gm, tensor) is not None:
            continue
        target, convert = SCALAR_OPS[node.target]
        node.target, node.args = target, (tensor, _constant_before(gm, node, QuantizedConstant(convert(value))))
