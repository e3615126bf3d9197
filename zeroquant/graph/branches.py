"""Parallel branches merged into one conv (the re-parameterisation RepVGG, MobileOne, RepGhost and FastViT do for
deployment, applied to whatever train-time form the user brings): a sum or difference of convs of one input, with
per-channel constant scales and offsets (layer scales, + 0), is one linear function of that input, and when every
conv has the same stride and groups and a centred odd kernel, it is a single conv whose kernel is the weighted sum
of the branches' kernels, zero-padded to the largest.

After BatchNorm folding every branch is a conv (a BN alone on the input has become a depthwise 1x1 conv), so
FastViT's RepMixer x + s * (mixer(x) - norm(x)) becomes x + one depthwise conv instead of three convs, a
subtraction (no integer kernel) and a float scale; each merged op is also one rounding fewer. The input itself is
never merged in (x + conv(x) stays an add, unlike the deploy forms): a 1 at the kernel's centre would set that
channel's weight scale, and a layer-scaled branch (FastViT's scales start at 1e-5) would vanish below its step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zeroquant.graph.batchnorm import DROPOUTS
from zeroquant.graph.ops import aten, attribute_value, constant_value, pair, register_parameter

ADDS = {aten.add.Tensor, aten.add_.Tensor}
SUBS = {aten.sub.Tensor, aten.sub_.Tensor}
MULS = {aten.mul.Tensor, aten.mul_.Tensor}
ARITHMETIC = ADDS | SUBS | MULS


@dataclass
class Linear:
    """weight * source + bias as one conv (weight [out, in / groups, k, k]); `convs` are the conv nodes it holds,
    `members` every node it replaces (producers first)."""

    source: torch.fx.Node
    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    groups: int
    convs: list[torch.fx.Node]
    members: list[torch.fx.Node]
    absorbed: int = 0  # add / sub / mul nodes folded in


def merge_branches(gm: torch.fx.GraphModule) -> int:
    """Replace every largest sum of parallel branches by the conv it equals; returns how many graph nodes that
    removed (ops and parameter reads)."""
    removed, alive = 0, set(gm.graph.nodes)
    for node in reversed(list(gm.graph.nodes)):
        if node not in alive or node.op != "call_function" or node.target not in ARITHMETIC:
            continue
        form = _linear(gm, node, root=True)
        if form is None or form.absorbed == 0:  # a lone conv: nothing merged
            continue
        before = len(alive)
        _replace(gm, node, form)
        for member in reversed(form.members):  # in-place adds too: their inputs had no other reader
            if not member.users:
                gm.graph.erase_node(member)
        gm.graph.eliminate_dead_code()  # their parameter reads
        alive = set(gm.graph.nodes)
        removed += before - len(alive)
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


def _linear(gm: torch.fx.GraphModule, node, root: bool = False) -> Linear | None:
    """node as one conv of a single source, or None. Inner nodes must have no other reader: they disappear."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or (not root and len(node.users) != 1):
        return None
    if node.target == aten.conv2d.default:
        return _conv(gm, node)
    if node.target in DROPOUTS:  # eval-mode dropout: the identity
        form = _linear(gm, node.args[0])
        return None if form is None else Linear(form.source, form.weight, form.bias, form.stride, form.groups,
                                                form.convs, form.members + [node], form.absorbed)
    if node.target in MULS and len(node.args) == 2 and not node.kwargs:
        for tensor, constant in (node.args, node.args[::-1]):
            form = _linear(gm, tensor)
            scale = _channel_values(gm, constant, form.weight) if form is not None else None
            if scale is not None:
                return Linear(form.source, form.weight * scale.reshape(-1, 1, 1, 1), form.bias * scale, form.stride,
                              form.groups, form.convs, form.members + [node], form.absorbed + 1)
        return None
    if node.target in ADDS | SUBS and len(node.args) == 2 and not node.kwargs:
        sign = -1.0 if node.target in SUBS else 1.0
        left, right = _linear(gm, node.args[0]), _linear(gm, node.args[1])
        if left is not None and right is None:  # conv + c, conv - c
            offset = _channel_values(gm, node.args[1], left.weight)
            if offset is not None:
                return Linear(left.source, left.weight, left.bias + sign * offset, left.stride, left.groups,
                              left.convs, left.members + [node], left.absorbed + 1)
        if right is not None and left is None:  # c + conv, c - conv
            offset = _channel_values(gm, node.args[0], right.weight)
            if offset is not None:
                return Linear(right.source, sign * right.weight, offset + sign * right.bias, right.stride,
                              right.groups, right.convs, right.members + [node], right.absorbed + 1)
        if left is None or right is None or _layout(left) != _layout(right):
            return None
        size = max(left.weight.shape[-1], right.weight.shape[-1])
        weight = _padded(left.weight, size) + sign * _padded(right.weight, size)
        return Linear(left.source, weight, left.bias + sign * right.bias, left.stride, left.groups,
                      left.convs + right.convs, left.members + right.members + [node],
                      left.absorbed + right.absorbed + 1)
    return None


def _layout(form: Linear) -> tuple:
    """What two branches must share to be one conv: input, stride, groups, output and per-group input channels."""
    return form.source, form.stride, form.groups, tuple(form.weight.shape[:2])


def _conv(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Linear | None:
    """A conv with a centred odd square kernel and no dilation, as a Linear of its input."""
    args = list(node.args) + [None, [1], [0], [1], 1][len(node.args) - 2:]
    source, weight_node, bias_node, stride, padding, dilation, groups = args[:7]
    if not isinstance(source, torch.fx.Node) or not isinstance(weight_node, torch.fx.Node) or node.kwargs:
        return None
    weight = attribute_value(gm, weight_node)
    stride, padding, dilation = (pair(v) for v in (stride, padding, dilation))
    size = weight.shape[-1]
    if weight.dim() != 4 or weight.shape[-2] != size or size % 2 == 0 or padding != (size // 2, size // 2) or \
            dilation != (1, 1) or stride[0] != stride[1]:
        return None
    bias = attribute_value(gm, bias_node) if isinstance(bias_node, torch.fx.Node) else weight.new_zeros(weight.shape[0])
    return Linear(source, weight, bias, stride[0], int(groups), [node], [node])


def _channel_values(gm: torch.fx.GraphModule, constant, weight: torch.Tensor) -> torch.Tensor | None:
    """A Python number, or a parameter of one value or one per output channel of `weight` ([C, 1, 1] or
    [1, C, 1, 1]), as [C] on weight's device and dtype."""
    channels, value = weight.shape[0], constant_value(gm, constant)
    if isinstance(value, float):
        return weight.new_full((channels,), value)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    if value.numel() == 1:
        return value.reshape(1).expand(channels).to(weight).clone()
    shape = list(value.shape)
    if value.numel() == channels and value.dim() in (3, 4) and shape[-2:] == [1, 1] and shape[-3] == channels:
        return value.reshape(channels).to(weight).clone()
    return None


def _padded(weight: torch.Tensor, size: int) -> torch.Tensor:
    margin = (size - weight.shape[-1]) // 2
    return F.pad(weight, [margin] * 4)


def _replace(gm: torch.fx.GraphModule, root: torch.fx.Node, form: Linear) -> None:
    size = form.weight.shape[-1]
    template = max(form.convs, key=lambda conv: attribute_value(gm, conv.args[1]).shape[-1])
    base = str(template.name)
    with gm.graph.inserting_before(root):
        weight = register_parameter(gm, f"{base}_merged_weight", form.weight)
        bias = register_parameter(gm, f"{base}_merged_bias", form.bias)
        conv = gm.graph.call_function(aten.conv2d.default, (form.source, weight, bias, [form.stride] * 2,
                                                            [size // 2] * 2, [1, 1], form.groups))
    conv.meta = {key: value for key, value in template.meta.items() if key != "bn_output"}  # module path
    conv.meta["val"] = root.meta["val"]
    root.replace_all_uses_with(conv)
