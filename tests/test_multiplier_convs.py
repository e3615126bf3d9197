"""Grouped convs with a channel multiplier run as depthwise convs over repeated channels
(export/multiplier_convs.py): exact, and in onnxruntime's depthwise kernel."""

import numpy as np
import onnx
from torch import nn

import zeroquant
from tests.test_channel_padding import QdqGraph, conv_widths
from tests.test_coverage import FAST, populated
from zeroquant.export.multiplier_convs import repeat_multiplier_convs
from zeroquant.runtime import run_all, session


def patch_embedding() -> onnx.ModelProto:
    """A 7x7 stride-1 grouped conv 8 -> 16 (groups 8: two outputs per input channel), then a pointwise conv."""
    g = QdqGraph(8)
    g.output_channels = 8
    x = g.requantize("input")
    weight = g.rng.integers(-127, 128, (16, 1, 7, 7)).astype(np.int8)
    scale = (g.rng.random(16) * 0.01 + 0.002).astype(np.float32)
    w = g.node("DequantizeLinear", [g.constant("embed.weight", weight), g.constant("embed.scale", scale),
                                    g.constant("embed.zero", np.zeros(16, np.int8))], axis=0)
    embedded = g.requantize(g.node("Conv", [x, w], group=8, kernel_shape=[7, 7], pads=[3, 3, 3, 3]))
    return g.model(g.conv(embedded, 16, 8))


def test_a_multiplier_conv_becomes_a_depthwise_conv_exactly():
    model, rewritten = patch_embedding(), patch_embedding()
    assert repeat_multiplier_convs(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    assert conv_widths(rewritten)["embed.weight"] == (16, 16)
    x = np.random.default_rng(1).standard_normal((4, 8, 12, 12)).astype(np.float32)
    assert np.array_equal(run_all(session(model), x)[0], run_all(session(rewritten), x)[0])
    assert repeat_multiplier_convs(rewritten) == 0, "a depthwise conv is left as it is"


class Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.embed = nn.Sequential(nn.Conv2d(16, 32, 7, 2, 3, groups=16), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.embed(self.stem(x)).mean((2, 3)))


def test_the_export_runs_multiplier_convs_as_depthwise(tmp_path):
    result = zeroquant.quantize(populated(Embedding(), (3, 32, 32)), tmp_path / "embed.onnx",
                                input_shape=(3, 32, 32), **FAST)
    assert conv_widths(onnx.load(tmp_path / "embed.onnx"))["embed_0.weight"] == (32, 32)
    assert any("channel multiplier" in note for note in result.report.notes)
    assert result.report.census["integer_mac_fraction"] == 1.0
    assert result.report.parity["relative_max_diff"] < 0.02
