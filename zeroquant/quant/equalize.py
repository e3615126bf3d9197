"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): in a chain conv -> ReLU -> conv, output
channel i of the first layer is divided by s_i and input channel i of the second multiplied by s_i. ReLU commutes
with positive scaling, so the float function is unchanged, and s_i = sqrt(r1_i / r2_i) gives both layers the same
weight range on that channel, which evens out the channels one per-tensor activation grid has to cover.

Only exact rewrites are made: ReLU6 (and any clamp with an upper bound) does not commute with scaling, so chains
through it are left alone; so are chains where the first layer's output has other users.
"""

from __future__ import annotations

import functools
import math

import torch

from zeroquant.graph.ops import Role, aten, is_relu_like, relu_upper_bound, role

SCALE_LIMITS = (1e-2, 1e2)  # no channel is scaled further than this (near-zero weights would blow up)


def _sole_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def equalization_pairs(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(first, second) conv/linear pairs joined by an unbounded ReLU (and maybe zero padding) and nothing else."""
    pairs = []
    for node in gm.graph.nodes:
        if role(node) is not Role.WEIGHTED or node.target != aten.conv2d.default:
            continue
        relu = _sole_user(node)
        if relu is None or not is_relu_like(relu) or not math.isinf(relu_upper_bound(relu)):
            continue
        second = _sole_user(relu)
        while second is not None and _is_zero_pad(second):
            second = _sole_user(second)
        if second is not None and role(second) is Role.WEIGHTED and \
                _input_channels(gm, second) == _param(gm, node.args[1]).shape[0]:
            pairs.append((node, second))
    return pairs


def _is_zero_pad(node: torch.fx.Node) -> bool:
    """Zero padding commutes with channel scaling."""
    if node.target == aten.constant_pad_nd.default:
        return len(node.args) < 3 or not node.args[2]
    if node.target == aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        return mode == "constant" and not value
    return False


def _param(gm: torch.fx.GraphModule, node: torch.fx.Node | None) -> torch.Tensor | None:
    return None if node is None else functools.reduce(getattr, node.target.split("."), gm)


def _groups(node: torch.fx.Node) -> int:
    return int(node.args[6]) if node.target == aten.conv2d.default and len(node.args) > 6 else 1


def _input_channels(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    return _param(gm, node.args[1]).shape[1] * _groups(node)


def _by_input_channel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """View [groups, out per group, in per group, rest]: input channel c is [c // in_pg, :, c % in_pg]."""
    return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)


def equalize(gm: torch.fx.GraphModule) -> int:
    """Equalize every exact pair in place (weights, biases and the BN-derived output statistics); returns how many."""
    pairs = equalization_pairs(gm)
    for first, second in pairs:
        w1, b1 = _param(gm, first.args[1]), _param(gm, first.args[2] if len(first.args) > 2 else None)
        w2 = _param(gm, second.args[1])
        groups = _groups(second)
        grouped = _by_input_channel(w2.data, groups)
        r1 = w1.detach().abs().flatten(1).amax(1)
        r2 = grouped.abs().amax(dim=(1, 3)).reshape(-1)
        scale = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-12)), torch.ones_like(r1))
        scale = scale.clamp(*SCALE_LIMITS)
        w1.data /= scale.reshape(-1, *([1] * (w1.dim() - 1)))
        if b1 is not None:
            b1.data /= scale
        w2.data = (grouped * scale.reshape(groups, 1, -1, 1)).reshape(w2.shape)
        stats = first.meta.get("bn_output")
        if stats is not None:
            first.meta["bn_output"] = (stats[0] / scale, stats[1] / scale)
    return len(pairs)
