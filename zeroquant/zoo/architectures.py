"""Builders for the `arch` names of models.yaml. A builder returns an untrained model and never downloads anything:
weights are always loaded afterwards from a local file."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zeroquant.optional import require


class _SubsamplePad(nn.Module):
    """Option-A shortcut: drop every other pixel, then zero-pad the channels (no parameters, export-friendly)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        downsample = stride != 1 or in_planes != planes
        self.shortcut = _SubsamplePad(planes // 4) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-10 ResNet of He et al. 2016 (3 stages of 16/32/64 channels, option-A shortcuts).

    Module names follow akamaster/pytorch_resnet_cifar10 so its published checkpoints load with strict=True."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks, 1)
        self.layer2 = self._stage(16, 32, blocks, 2)
        self.layer3 = self._stage(32, 64, blocks, 2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        first = _BasicBlock(in_planes, planes, stride)
        return nn.Sequential(first, *(_BasicBlock(planes, planes, 1) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def cifar_resnet(depth: int, num_classes: int = 10) -> nn.Module:
    return CifarResNet(depth, num_classes)


def efficientnet_lite(variant: str, num_classes: int = 1000) -> nn.Module:
    """EfficientNet-Lite from efficientnet-lite-pytorch; `from_name` builds without fetching weights."""
    package = require("efficientnet_lite_pytorch", "zoo", "the EfficientNet-Lite zoo entries")
    return package.EfficientNet.from_name(variant, num_classes=num_classes)


def torchvision_model(name: str, num_classes: int = 1000) -> nn.Module:
    """A torchvision classifier with random weights (`weights=None`: nothing is fetched)."""
    models = require("torchvision.models", "vision", "the torchvision zoo entries")  # costs seconds: only here
    return getattr(models, name)(weights=None, num_classes=num_classes)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet": cifar_resnet,
    "efficientnet_lite": efficientnet_lite,
    "torchvision": torchvision_model,
}
