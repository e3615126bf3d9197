"""Shared fixtures: where ../shared lives, a private calibration cache per test session, and small real models."""

from pathlib import Path

import pytest
import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Distilled sets go to a temporary cache, never to the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ZEROQUANT_CACHE", str(tmp_path_factory.mktemp("zq-cache")))
    yield
    mp.undo()


class SmallNet(nn.Module):
    """A little of everything zeroquant must handle: conv-BN-ReLU, a residual add, "same" zero padding written as
    its own op before a strided depthwise conv with ReLU6, max and average pooling, flatten and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.depthwise = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2, groups=8, bias=False),
                                       nn.BatchNorm2d(8), nn.ReLU6())
        self.pointwise = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.branch(x))
        x = nn.functional.max_pool2d(x, 2)
        x = self.pointwise(self.depthwise(x))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def make_small_net(seed: int = 0) -> nn.Module:
    """SmallNet with random weights and BN statistics that are consistent with them (a few training-mode passes)."""
    torch.manual_seed(seed)
    model = SmallNet()
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(16, 3, 16, 16))
    return model.eval()


@pytest.fixture
def small_net() -> nn.Module:
    return make_small_net()
