"""Turn a BN-folded graph into a quantization simulation: QuantizedLayer for every conv/linear and an
ActivationQuantizer on every tensor that onnxruntime should carry as uint8.

The placement mirrors what onnxruntime fuses into integer kernels: DQ -> Conv -> (Relu) -> Q becomes QLinearConv,
DQ,DQ -> Add -> (Relu) -> Q becomes QLinearAdd, and shape-only ops sit between Q/DQ pairs of one shared scale. The
inputs and the output of a concat share one quantizer too, so the uint8 tensors are joined as they are. The model's
outputs stay float (the last layer dequantizes into float logits).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from zeroquant.graph.ops import (Role, aten, attribute_value, is_float_tensor, is_relu_like, layer_name,
                                 passthrough_source, relu_upper_bound, role)
from zeroquant.quant.quantizers import ActivationQuantizer, GateQuantizer, QuantizedLayer
from zeroquant.quant.ranges import ChannelGaussians

FUSABLE_PRODUCERS = {aten.add.Tensor, aten.add_.Tensor}
# ops that read float: their input gets no quantizer, so onnxruntime runs them in float. QLinearSoftmax took 3.9 ms
# against 0.6 ms for the float Softmax on mobilevit_xxs's nine attention maps (batch 1, one thread); the product
# before it then runs as MatMulIntegerToFloat, integer multiply-accumulates with a float result.
FLOAT_READERS = {aten.softmax.int, aten._softmax.default}


@dataclass
class QuantSim:
    graph_module: torch.fx.GraphModule
    layers: dict[str, QuantizedLayer]
    activations: dict[str, ActivationQuantizer]
    layer_inputs: dict[str, str] = field(default_factory=dict)  # layer -> name of the quantizer feeding it
    input_quantizer: str | None = None  # the quantizer of the model's input (the image)

    def set_enabled(self, weights: bool, activations: bool) -> None:
        for layer in self.layers.values():
            layer.enabled = weights
        for quantizer in self.activations.values():
            quantizer.enabled = activations

    def fewest_bits(self) -> tuple[int, int]:
        """(weight bits, activation bits): the fewest of any layer and of any quantizer (8 where there are none)."""
        return (min((layer.bits for layer in self.layers.values()), default=8),
                min((quantizer.bits for quantizer in self.activations.values()), default=8))

    @contextmanager
    def float_pass(self):
        """Inside, the simulation computes the float model; every layer and quantizer gets back its own setting."""
        saved = [(module, module.enabled) for module in [*self.layers.values(), *self.activations.values()]]
        self.set_enabled(weights=False, activations=False)
        try:
            yield
        finally:
            for module, enabled in saved:
                module.enabled = enabled

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.graph_module(x)

    def layer_macs(self, input_shape) -> dict[str, int]:
        """Multiply-accumulates of every conv/linear layer for one image."""
        macs, hooks = {}, []
        for name, layer in self.layers.items():
            hooks.append(layer.register_forward_hook(
                lambda module, _, out, name=name: macs.__setitem__(name, out[0].numel() * module.macs_per_output)))
        try:
            with torch.no_grad():
                self(torch.zeros(1, *input_shape))
        finally:
            for hook in hooks:
                hook.remove()
        return macs


def as_outputs(value) -> list[torch.Tensor]:
    """A model's result as a list of its output tensors (one for a classifier)."""
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _fuses_activation(node: torch.fx.Node) -> bool:
    """True when the node's only user is a relu-like op that onnxruntime folds into the QuantizeLinear after it."""
    users = list(node.users)
    return len(users) == 1 and is_relu_like(users[0])


def _module_name(base: str, taken) -> str:
    name = base.replace(".", "_") or "layer"
    candidate, index = name, 1
    while candidate in taken:
        candidate, index = f"{name}_{index}", index + 1
    return candidate


def build_quantsim(folded: torch.fx.GraphModule, weight_bits: int = 8, activation_bits: int = 8,
                   reduce_range: bool = True) -> QuantSim:
    gm = copy.deepcopy(folded)
    graph = gm.graph
    layers: dict[str, QuantizedLayer] = {}
    activations: dict[str, ActivationQuantizer] = {}
    quantizer_of: dict[torch.fx.Node, str] = {}
    image = None
    layer_inputs: dict[str, str] = {}
    taken: set[str] = {name for name, _ in gm.named_children()}

    def quantize_output(node: torch.fx.Node, shared: str | None = None, gate_of: str | None = None) -> None:
        if _only_feeds_outputs(node) and not _is_conv(node, layers):
            return  # a model output stays float (a classifier's QGemm writes float logits); onnxruntime has no conv
            # kernel with a float output, so a conv's output map is quantized and dequantized like any other
        if node.users and all(user.target in FLOAT_READERS for user in node.users) and not _is_conv(node, layers):
            return
        name = shared
        if name is None:
            name = _module_name(f"aq_{node.name}", taken)
            taken.add(name)
            activations[name] = (ActivationQuantizer(activation_bits) if gate_of is None
                                 else GateQuantizer(activations[gate_of], activation_bits))
            activations[name].prior = output_prior(node)
            if node.target == aten.hardsigmoid.default:
                activations[name].on_grid = 0.5
            gm.add_submodule(name, activations[name])
        with graph.inserting_after(node):
            qnode = graph.call_module(name, (node,))
        qnode.meta = dict(node.meta)
        node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        quantizer_of[qnode] = name

    def input_quantizer(node: torch.fx.Node) -> str | None:
        source = passthrough_source(node)
        return quantizer_of.get(source) if isinstance(source, torch.fx.Node) else None

    for node in list(graph.nodes):
        if node.op == "placeholder":
            if is_float_tensor(node):
                quantize_output(node)
                image = quantizer_of.get(next(iter(node.users), None))
            continue
        node_role = role(node)
        if node_role is None:
            continue
        if node_role is Role.WEIGHTED:
            fused = _fuses_activation(node)
            new = _replace_weighted(gm, node, weight_bits, reduce_range, layers, taken)
            layer_inputs[new.target] = input_quantizer(new)
            if not fused:
                quantize_output(new)
        elif node_role is Role.ACTIVATION and _fused_into(node.args[0], layers):
            quantize_output(node)
        elif node_role in (Role.PASSTHROUGH, Role.ACTIVATION):
            quantize_output(node, shared=input_quantizer(node))
        else:
            if node.target in FUSABLE_PRODUCERS and _fuses_activation(node):
                continue
            source = input_quantizer(node) if node.target == aten.hardsigmoid.default else None
            if source is not None and activations[source].on_grid in (None, -3.0):
                activations[source].on_grid = -3.0  # the gate's grid derives from it (GateQuantizer)
                quantize_output(node, gate_of=source)
                continue
            quantize_output(node)
    merged = _share_concat_quantizers(gm, activations, layer_inputs)
    graph.eliminate_dead_code()
    _delete_unused_attributes(gm)
    graph.lint()
    gm.recompile()
    return QuantSim(gm, layers, activations, layer_inputs, merged.get(image, image))


def _only_feeds_outputs(node: torch.fx.Node) -> bool:
    """Whether a value is used only as the model's output, directly or through shape-only ops (a flatten after a
    detector's concat): quantizing it there would only round the output."""
    return all(user.op == "output" or (role(user) is Role.PASSTHROUGH and _only_feeds_outputs(user))
               for user in node.users)


def _share_concat_quantizers(gm: torch.fx.GraphModule, activations: dict[str, ActivationQuantizer],
                             layer_inputs: dict[str, str]) -> dict[str, str]:
    """Merge the quantizers of every concat's inputs and output into one (union-find over all concats), so that
    onnxruntime joins the uint8 tensors without requantizing them: 0.95 ms against 1.25 ms for eight 96x56x56
    split / conv / concat blocks with differing scales. The merged range covers every member. A concat whose output
    stays float (a detector's boxes in pixels joined with its scores in [0, 1] as the model's output) keeps its
    inputs' own quantizers: one grid for both would round every score to 0."""
    parent = {name: name for name in activations}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.cat.default:
            continue
        joined = [u.target for u in node.users if u.op == "call_module" and u.target in activations]
        if not joined:  # a float concat (the model's output): no integer kernel to feed, nothing to share
            continue
        members = [t.target for t in node.args[0] if isinstance(t, torch.fx.Node) and t.target in activations]
        members += joined
        if any(isinstance(activations[member], GateQuantizer) for member in members):
            continue  # a hardsigmoid gate's grid is its input's: the concat requantizes instead
        for member in members[1:]:
            parent[find(member)] = find(members[0])
    merged = {name for name in activations if find(name) != name}
    stands_for = {id(activations[name]): activations[find(name)] for name in merged}
    for name in merged:  # the grid that stands for several must hold what one of them had to (a hardsigmoid's -3)
        root = activations[find(name)]
        root.on_grid = activations[name].on_grid if root.on_grid is None else root.on_grid
    for gate in activations.values():
        if isinstance(gate, GateQuantizer):
            gate.sources[0] = stands_for.get(id(gate.sources[0]), gate.sources[0])
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in merged:
            node.target = find(node.target)
    for layer, feeding in layer_inputs.items():
        if feeding in merged:
            layer_inputs[layer] = find(feeding)
    for name in merged:
        activations[find(name)].prior = None  # the BN-derived histogram describes one member, not the union
        del activations[name]
        delattr(gm, name)
    return {name: find(name) for name in merged}  # merged quantizer -> the one that stands for it now


def clamp_quantizers(graph: torch.fx.Graph, activations: dict[str, ActivationQuantizer]):
    """Yield (ReLU/ReLU6 node, quantizer) where that enabled quantizer is the clamp's only user, so the clamp can be
    applied to its integer grid instead (the graph may be edited between yields)."""
    for node in list(graph.nodes):
        users = list(node.users)
        if is_relu_like(node) and len(users) == 1 and users[0].op == "call_module":
            quantizer = activations.get(users[0].target)
            if quantizer is not None and quantizer.enabled:
                yield node, quantizer


def output_prior(node: torch.fx.Node) -> ChannelGaussians | None:
    """The training-data distribution of a folded conv+BN's output, clamped by the relu-like op producing `node`."""
    low, high = -math.inf, math.inf
    if is_relu_like(node):
        low, high, node = 0.0, relu_upper_bound(node), node.args[0]
    stats = node.meta.get("bn_output") if isinstance(node, torch.fx.Node) else None
    return ChannelGaussians(*stats, low, high) if stats is not None else None


def _is_conv(node: torch.fx.Node, layers: dict) -> bool:
    return node.op == "call_module" and node.target in layers and layers[node.target].kind == "conv"


def _fused_into(producer, layers: dict) -> bool:
    """Whether this activation's producer left its output unquantized because the activation fuses into it."""
    if not isinstance(producer, torch.fx.Node) or len(producer.users) != 1:
        return False
    return (producer.op == "call_module" and producer.target in layers) or producer.target in FUSABLE_PRODUCERS


def _replace_weighted(gm, node, bits, reduce_range, layers, taken) -> torch.fx.Node:
    """Swap an aten conv2d/linear node for a QuantizedLayer module holding the same weights."""
    args = list(node.args) + [None] * (7 - len(node.args))
    x, weight_node, bias_node = args[:3]
    weight, bias = attribute_value(gm, weight_node), attribute_value(gm, bias_node)
    if node.target == aten.conv2d.default:
        stride, padding, dilation, groups = (args[3] or 1), (args[4] or 0), (args[5] or 1), (args[6] or 1)
        layer = QuantizedLayer(layer_name(node), "conv", weight, bias, bits, (stride, padding, dilation, groups),
                               reduce_range)
    else:
        layer = QuantizedLayer(layer_name(node), "linear", weight, bias, bits, reduce_range=reduce_range)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module("", (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for attr in (weight_node, bias_node):
        if attr is not None and not attr.users:
            gm.graph.erase_node(attr)
    _release_original(gm, layer.name.replace(".", "_"), taken)
    name = _module_name(layer.name, taken)
    taken.add(name)
    gm.add_submodule(name, layer)
    layers[name] = layer
    new.target = name
    return new


def _release_original(gm: torch.fx.GraphModule, name: str, taken: set) -> None:
    """Free a top-level name held by the original module (e.g. 'head') once no node reads its parameters, so the
    quantized layer takes the name the user knows instead of 'head_1'."""
    module = gm._modules.get(name)
    if module is None or isinstance(module, (QuantizedLayer, ActivationQuantizer)):
        return
    if any(n.op == "get_attr" and n.target.split(".")[0] == name for n in gm.graph.nodes):
        return
    delattr(gm, name)
    taken.discard(name)


def _delete_unused_attributes(gm: torch.fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(recurse=False)) + list(gm.named_buffers(recurse=False)):
        if name not in used:
            delattr(gm, name)
    gm.delete_all_unused_submodules()
