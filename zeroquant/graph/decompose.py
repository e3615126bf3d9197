"""Exact aten-level rewrites that turn ops without an integer kernel into ops with one, before the simulation is
built (each measured against the float op it replaces; see benchmarks/RESULTS.md, coverage):

- silu(x) -> x * sigmoid(x): QLinearSigmoid (a table lookup in onnxruntime) and QLinearMul instead of a float island
  (DQ, Sigmoid, Mul, Q): 2.1 ms against 3.3 ms for eight 96x56x56 activations between int8 convs.
- hardswish(x) -> x * hardsigmoid(x): hardsigmoid is exported as a Clip of x's uint8 tensor (see
  export/integer_model.py) and the product as QLinearMul: faster than the float HardSwish between int8 convs (2.1 ms
  against 3.1 ms when the gate was still a QLinearAdd), with identical outputs.
- scaled_dot_product_attention(q, k, v) -> softmax((q * scale) @ k^T (+ mask)) @ v: the fused op is one float
  island (MatMul, Softmax, MatMul in onnxruntime); written out, both products read quantized inputs: q K^T runs as
  MatMulIntegerToFloat (the softmax reads float, see quant/sim.py), attention x V as QLinearMatMul, the scale as
  QLinearMul (timm's attention blocks call it, e.g. MobileViT's; on mobilevit_xxs the products took 1.17 ms against
  1.38 ms in float).
- avg_pool2d -> a depthwise conv with weights 1 / (kh * kw) (no divisor override, no partial window from ceil_mode):
  onnxruntime's QLinearAveragePool took 0.98 ms for a 3x3 stride-2 pool of 128 x 56 x 56 uint8, the int8 depthwise
  conv 0.078 ms (float AveragePool 0.084 ms); the weights are all equal, so they sit on the grid at any bit width.
  A pool that does not count its padding (EfficientFormer's token mixer) is that conv times a constant map of
  kh kw / count (QLinearMul): 0.25 ms against 0.97 ms for 48 x 56 x 56 between two 1x1 convs.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch._guards import detect_fake_mode

from zeroquant.graph.batchnorm import fold_batchnorm
from zeroquant.graph.branches import merge_branches
from zeroquant.graph.constants import drop_identity_arithmetic
from zeroquant.graph.ops import is_float_tensor, pair, register_parameter, uint8_step

aten = torch.ops.aten


def _silu(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    x = node.args[0]
    gate = graph.call_function(aten.sigmoid.default, (x,))
    return graph.call_function(aten.mul.Tensor, (x, gate))


def _hardswish(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    x = node.args[0]
    gate = graph.call_function(aten.hardsigmoid.default, (x,))
    return graph.call_function(aten.mul.Tensor, (x, gate))


def _attention(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node | None:
    """The math of F.scaled_dot_product_attention in eval mode; None (kept fused) for a boolean mask, causal
    masking, dropout or grouped-query heads, which it would have to spell out further."""
    args = list(node.args) + [None, 0.0, False][len(node.args) - 3:]
    query, key, value, mask, dropout, causal = args[:6]
    scale, grouped = node.kwargs.get("scale"), node.kwargs.get("enable_gqa", False)
    if causal or dropout or grouped or (mask is not None and not is_float_tensor(mask)):
        return None
    scale = 1 / math.sqrt(query.meta["val"].shape[-1]) if scale is None else scale
    scaled = graph.call_function(aten.mul.Tensor, (query, float(scale)))
    scores = graph.call_function(aten.matmul.default, (scaled, graph.call_function(aten.transpose.int, (key, -2, -1))))
    if mask is not None:
        scores = graph.call_function(aten.add.Tensor, (scores, mask))
    weights = graph.call_function(aten.softmax.int, (scores, -1))
    return graph.call_function(aten.matmul.default, (weights, value))


DECOMPOSITIONS = {
    aten.silu.default: _silu, aten.silu_.default: _silu,
    aten.hardswish.default: _hardswish, aten.hardswish_.default: _hardswish,
    aten.hardsigmoid_.default: lambda graph, node: graph.call_function(aten.hardsigmoid.default, (node.args[0],)),
    aten.scaled_dot_product_attention.default: _attention,
}


def decompose(graph_module: torch.fx.GraphModule) -> int:
    """Rewrite every op of DECOMPOSITIONS in place (the float function is unchanged); returns how many."""
    graph, count = graph_module.graph, 0
    for node in list(graph.nodes):
        rewrite = DECOMPOSITIONS.get(node.target) if node.op == "call_function" else None
        if rewrite is None:
            continue
        before = set(graph.nodes)
        with graph.inserting_before(node):
            new = rewrite(graph, node)
        if new is None:
            continue
        for created in [n for n in graph.nodes if n not in before]:  # in order: each one's inputs have values
            created.meta = dict(node.meta)  # the module path of the op they replace
            created.meta["val"] = _fake_value(created)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    graph.lint()
    graph_module.recompile()
    return count


def _fake_value(node: torch.fx.Node):
    """The node's (fake) output tensor, computed from its inputs' as torch.export records them: shape and dtype."""
    values = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    with detect_fake_mode(torch.utils._pytree.tree_leaves(values)) or contextlib.nullcontext():
        return node.target(*values[0], **values[1])


def _pools_as_convs(graph_module: torch.fx.GraphModule) -> int:
    """Rewrite every average pool that equals a depthwise conv (see above) as one; returns how many."""
    graph, count = graph_module.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.avg_pool2d.default:
            continue
        args = list(node.args) + [[], 0, False, True, None][len(node.args) - 2:]
        source, kernel, stride, padding, ceil_mode, count_include_pad, divisor = args[:7]
        before, after = source.meta.get("val"), node.meta.get("val")
        kernel = pair(kernel)
        stride, padding = pair(stride or kernel), pair(padding)
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)) or before.dim() != 4 or \
                node.kwargs or divisor is not None:
            continue
        floor = [(size + 2 * p - k) // s + 1 for size, k, s, p in zip(before.shape[2:], kernel, stride, padding)]
        if ceil_mode and list(after.shape[2:]) != floor:
            continue  # a partial window at the edge divides by fewer elements
        channels = before.shape[1]
        weight = torch.full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=before.dtype,
                            device=before.device)
        with graph.inserting_before(node):
            weight_node = register_parameter(graph_module, f"{node.name}_weight", weight)
            bias_node = register_parameter(graph_module, f"{node.name}_bias", weight.new_zeros(channels))
            conv = graph.call_function(aten.conv2d.default, (source, weight_node, bias_node, list(stride),
                                                             list(padding), [1, 1], channels))
            pooled = conv
            if any(padding) and not count_include_pad:
                factor = _count_factor(before, kernel, stride, padding)
                pooled = graph.call_function(aten.mul.Tensor, (conv, register_parameter(
                    graph_module, f"{node.name}_count_factor", factor)))
        conv.meta, pooled.meta = dict(node.meta), dict(node.meta)  # the pool's shape, both
        node.replace_all_uses_with(pooled)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        graph_module.recompile()
    return count


def _count_factor(before: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """kh kw / (the window's elements inside the image) per output position, [1, 1, H, W]: what turns a pool that
    counts the padding into one that does not, held on a uint8 grid so that the export writes it as a uint8
    constant and onnxruntime multiplies in QLinearMul. Exact where a grid 1 / m holds every value (3x3: 1, 1.5 and
    2.25 are 4, 6 and 9 quarters); otherwise rounded to the grid max / 255 (within 0.5 %), in the simulation too."""
    ones = torch.ones(1, 1, *before.shape[2:], dtype=torch.float64)
    counts = torch.nn.functional.avg_pool2d(ones, kernel, stride, padding, count_include_pad=False, divisor_override=1)
    factor = (kernel[0] * kernel[1]) / counts  # the pool's own shape: no partial windows reach here
    step = uint8_step(factor) or float(factor.max()) / 255
    return ((factor / step).round() * step).to(before.dtype)


def for_quantization(graph_module: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """The graph the simulation is built on: a copy with BatchNorms folded (or made depthwise convs), x * 1 and x + 0
    dropped (graph/constants.py), parallel branches of one input merged into one conv (graph/branches.py) and the
    ops above rewritten; returns it and how many BN layers were not folded into the layer before them."""
    folded, unfolded = fold_batchnorm(graph_module)
    drop_identity_arithmetic(folded)
    merge_branches(folded)
    decompose(folded)
    _pools_as_convs(folded)
    return folded, unfolded
