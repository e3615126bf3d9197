"""Ops computed from parameters alone (weight standardisation: NF-ResNets and BiT normalise each conv's weights with
F.batch_norm in training mode, at every call) are evaluated once at capture, so the conv reads a plain weight tensor:
it quantizes per channel like any other, and that batch_norm is no BatchNorm layer of the network (no statistics to
distil from, no training-mode graph)."""

from __future__ import annotations

import operator

import torch

from zeroquant.graph.ops import attribute_value


def depends_on_input(node: torch.fx.Node) -> bool:
    """Whether a node's value varies with the model's input (reads a placeholder, directly or not)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return True
        for source in current.all_input_nodes:
            if source not in seen:
                seen.add(source)
                stack.append(source)
    return False


def fold_parameter_ops(graph_module: torch.fx.GraphModule) -> int:
    """Replace every float-tensor op whose inputs are all parameters or constants (and that a later op reads) by a
    parameter holding its value; returns how many ops were folded."""
    graph, folded = graph_module.graph, 0
    constant: dict[torch.fx.Node, torch.Tensor] = {}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            if isinstance(operator.attrgetter(node.target)(graph_module), torch.Tensor):  # not a subgraph
                constant[node] = attribute_value(graph_module, node)
            continue
        if node.op != "call_function" or not node.all_input_nodes or \
                any(n not in constant for n in node.all_input_nodes):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: constant[n])
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        constant[node] = value
    for node in [n for n in constant if n.op == "call_function"]:
        if all(user in constant for user in node.users):
            continue  # an intermediate (or unused): only the last op of a chain becomes a parameter
        name, index = f"folded_{node.name}", 0
        while hasattr(graph_module, name):
            name, index = f"folded_{node.name}_{index}", index + 1
        graph_module.register_parameter(name, torch.nn.Parameter(constant[node].detach().clone(),
                                                                 requires_grad=False))
        with graph.inserting_before(node):
            attribute = graph.get_attr(name)
        attribute.meta = dict(node.meta)
        node.replace_all_uses_with(attribute)
        folded += 1
    graph.eliminate_dead_code()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return folded
