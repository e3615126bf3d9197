"""Ops computed from parameters alone (weight standardisation: NF-ResNets and BiT normalise each conv's weights with
F.batch_norm in training mode, at every call) are evaluated once at capture, so the conv reads a plain weight tensor:
it quantizes per channel like any other, and that batch_norm is no BatchNorm layer of the network (no statistics to
distil from, no training-mode graph). And arithmetic with a constant that leaves its input as it is (x * 1, x + 0:
HGNetV2's affine blocks as initialised) is dropped before quantization, as onnxruntime drops it from a float graph:
quantized, each one would be an integer kernel and a rounding (hgnetv2_b0: 62 of them, 0.87 ms of 4.5)."""

from __future__ import annotations

import operator

import torch

from zeroquant.graph.ops import COMMUTATIVE, aten, attribute_value, constant_value


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


IDENTITIES = {aten.add.Tensor: 0.0, aten.add_.Tensor: 0.0, aten.sub.Tensor: 0.0, aten.sub_.Tensor: 0.0,
              aten.mul.Tensor: 1.0, aten.mul_.Tensor: 1.0, aten.div.Tensor: 1.0, aten.div_.Tensor: 1.0}


def drop_identity_arithmetic(graph_module: torch.fx.GraphModule) -> int:
    """Remove every x + 0, x - 0, x * 1, x / 1 (0 + x, 1 * x) whose constant is a number or a parameter of those
    values that does not broadcast x to another shape; returns how many."""
    graph, dropped = graph_module.graph, 0
    for node in list(graph.nodes):
        identity = IDENTITIES.get(node.target) if node.op == "call_function" else None
        if identity is None or len(node.args) != 2 or node.kwargs:
            continue
        orders = [node.args, node.args[::-1]] if node.target in COMMUTATIVE else [node.args]
        for tensor, constant in orders:
            if isinstance(tensor, torch.fx.Node) and _is_everywhere(graph_module, constant, identity) and \
                    _same_tensor_type(tensor, node):
                node.replace_all_uses_with(tensor)
                graph.erase_node(node)
                dropped += 1
                break
    if dropped:
        graph.eliminate_dead_code()
        graph_module.recompile()
    return dropped


def _is_everywhere(graph_module: torch.fx.GraphModule, constant, value: float) -> bool:
    found = constant_value(graph_module, constant)
    if isinstance(found, torch.Tensor):
        return bool((found == value).all())
    return found == value


def _same_tensor_type(tensor: torch.fx.Node, result: torch.fx.Node) -> bool:
    before, after = tensor.meta.get("val"), result.meta.get("val")
    return isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and \
        before.shape == after.shape and before.dtype == after.dtype
