"""The integer model: the QuantSim with every fake-quant module swapped for its storage form (int8 weights, int32
biases, uint8 Q/DQ pairs), written with the quantized_decomposed ops that torch.onnx lowers to QuantizeLinear /
DequantizeLinear. torch.export of it therefore yields integer initializers directly, and onnxruntime fuses the
DQ -> Conv -> Q patterns into QLinearConv.
"""

from __future__ import annotations

import copy

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn

from zeroquant.graph.ops import relu_upper_bound
from zeroquant.quant.quantizers import INT32_MAX, ActivationQuantizer, QuantizedLayer
from zeroquant.quant.sim import QuantSim, clamp_quantizers

qd = torch.ops.quantized_decomposed


class QuantizeDequantize(nn.Module):
    """uint8 QuantizeLinear -> DequantizeLinear with the quantizer's scale and zero point.

    Below 8 bits a Clip on the uint8 tensor restricts it to the b-bit grid [0, 2^b - 1]: onnxruntime keeps that Clip
    in the integer domain between two QLinearConv kernels, whereas a float Clip would break their fusion.
    """

    def __init__(self, quantizer: ActivationQuantizer):
        super().__init__()
        self.scale, self.zero_point, self.qmax = quantizer.scale, quantizer.zero_point, 2**quantizer.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = qd.quantize_per_tensor(x, self.scale, self.zero_point, 0, 255, torch.uint8)
        if self.qmax < 255:
            q = torch.clamp(q, 0, self.qmax)
        return qd.dequantize_per_tensor(q, self.scale, self.zero_point, 0, 255, torch.uint8)


class IntegerLayer(nn.Module):
    """conv2d/linear whose weights are an int8 tensor and whose bias is an int32 tensor, both dequantized per channel."""

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
        return F.linear(x, weight, bias)


def integer_model(sim: QuantSim) -> torch.fx.GraphModule:
    """A copy of the simulation's graph in storage form, computing what the simulation computes."""
    gm = copy.deepcopy(sim.graph_module)
    for name, quantizer in sim.activations.items():
        setattr(gm, name, QuantizeDequantize(quantizer) if quantizer.enabled else nn.Identity())
    for name, layer in sim.layers.items():
        if layer.enabled:
            setattr(gm, name, IntegerLayer(layer))
    _drop_redundant_clamps(gm, sim)
    gm.recompile()
    return gm


def _drop_redundant_clamps(gm: torch.fx.GraphModule, sim: QuantSim) -> None:
    """Remove a ReLU/ReLU6 whose only user is a quantizer that already clamps to within its bounds (zero point 0,
    top of the grid <= 6). onnxruntime does this itself at 8 bits; below 8 bits the clamp sits on the uint8 tensor
    instead, where onnxruntime cannot see it, and the float Clip left in place would stop QLinearConv fusion."""
    for clamp, quantizer in clamp_quantizers(gm.graph, sim.activations):
        if quantizer.range[1] <= relu_upper_bound(clamp) + 1e-6:
            clamp.replace_all_uses_with(clamp.args[0])
            gm.graph.erase_node(clamp)
