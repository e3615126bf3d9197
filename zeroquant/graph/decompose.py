"""Exact aten-level rewrites that turn ops without an integer kernel into ops with one, before the simulation is
built (each measured against the float op it replaces; see benchmarks/RESULTS.md, coverage):

- silu(x) -> x * sigmoid(x): QLinearSigmoid (a table lookup in onnxruntime) and QLinearMul instead of a float island
  (DQ, Sigmoid, Mul, Q): 2.1 ms against 3.3 ms for eight 96x56x56 activations between int8 convs.
- hardswish(x) -> x * hardsigmoid(x): hardsigmoid is exported as one QLinearAdd (x + 3 quantized with 6x the scale
  of the [0, 1] grid it is read with, see export/integer_model.py) and the product as QLinearMul: 2.1 ms against
  3.1 ms for the float HardSwish, with identical outputs.
"""

from __future__ import annotations

import torch

from zeroquant.graph.batchnorm import fold_batchnorm

aten = torch.ops.aten


def _silu(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    x = node.args[0]
    gate = graph.call_function(aten.sigmoid.default, (x,))
    return graph.call_function(aten.mul.Tensor, (x, gate))


def _hardswish(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    x = node.args[0]
    gate = graph.call_function(aten.hardsigmoid.default, (x,))
    return graph.call_function(aten.mul.Tensor, (x, gate))


DECOMPOSITIONS = {
    aten.silu.default: _silu, aten.silu_.default: _silu,
    aten.hardswish.default: _hardswish, aten.hardswish_.default: _hardswish,
    aten.hardsigmoid_.default: lambda graph, node: graph.call_function(aten.hardsigmoid.default, (node.args[0],)),
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
        for created in set(graph.nodes) - before:
            created.meta = dict(node.meta)  # same shape, dtype and module path as the op they replace
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    graph.lint()
    graph_module.recompile()
    return count



def for_quantization(graph_module: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """The graph the simulation is built on: a copy with BatchNorms folded (or made depthwise convs) and the ops
    above decomposed; returns it and how many BN layers were not folded into the layer before them."""
    folded, unfolded = fold_batchnorm(graph_module)
    decompose(folded)
    return folded, unfolded
