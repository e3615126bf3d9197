"""The distiller interface: every method turns a BN network into calibration images the same way."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from zeroquant.graph.batchnorm import batchnorm_nodes
from zeroquant.graph.ops import attribute_value, layer_name


@dataclass
class DistillSettings:
    num_images: int = 32
    batch_size: int = 32
    iterations: int = 200
    lr: float = 0.2
    seed: int = 0

    def key(self) -> dict:
        return dict(vars(self))


@dataclass
class CalibSet:
    """Distilled images plus how well they match the BN statistics (per layer, for `inspect`)."""

    images: torch.Tensor
    method: str
    settings: dict
    final_loss: float = float("nan")
    layer_mismatch: dict[str, float] = field(default_factory=dict)


class Distiller(Protocol):
    name: str

    def distill(self, graph_module: torch.fx.GraphModule, input_shape: tuple[int, int, int],
                settings: DistillSettings, device: torch.device, progress=None) -> CalibSet: ...


class BatchNormTap(nn.Module):
    """Stands in for one BN layer: applies it (eval mode) and records how far the batch statistics of its input
    are from the layer's running statistics (ZeroQ's loss: L2 distance of means plus of standard deviations)."""

    def __init__(self, name, weight, bias, mean, var, eps, losses: list):
        super().__init__()
        self.name, self.eps, self.losses = name, eps, losses
        for attr, value in dict(weight=weight, bias=bias, mean=mean, var=var).items():
            self.register_buffer(attr, None if value is None else value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(x.dim()) if d != 1]
        batch_mean = x.mean(dims)
        batch_std = torch.sqrt(x.var(dims, unbiased=False) + self.eps)
        loss = torch.norm(batch_mean - self.mean) + torch.norm(batch_std - torch.sqrt(self.var + self.eps))
        self.losses.append((self.name, loss))
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps)


def tap_batchnorms(graph_module: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list]:
    """A copy of the graph whose BN nodes are BatchNormTaps writing their losses to the returned list."""
    gm = copy.deepcopy(graph_module)
    losses: list = []

    def attr(node):
        return attribute_value(gm, node)

    for index, node in enumerate(batchnorm_nodes(gm)):
        x, weight, bias, mean, var = node.args[:5]
        eps = float(node.args[7]) if len(node.args) > 7 else 1e-5
        name = f"bn_tap_{index}"
        gm.add_submodule(name, BatchNormTap(layer_name(node), attr(weight), attr(bias), attr(mean), attr(var),
                                            eps, losses))
        with gm.graph.inserting_after(node):
            tap = gm.graph.call_module(name, (x,))
        tap.meta = dict(node.meta)
        node.replace_all_uses_with(tap)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm, losses
