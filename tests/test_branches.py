"""Parallel branches of one input merged into one conv (graph/branches.py): the train-time forms of RepVGG,
MobileOne, RepGhost and FastViT, exact in float, and left alone wherever the sum is not one conv."""

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zeroquant
from tests.test_coverage import FAST, populated
from zeroquant.graph.capture import capture
from zeroquant.graph.decompose import for_quantization
from zeroquant.graph.ops import aten, uint8_step


class RepMixer(nn.Module):
    """FastViT's token mixer before re-parameterisation: x + s * (mixer(x) - norm(x)), the mixer a depthwise 3x3
    conv + BN plus a BN alone (MobileOne's identity branch) plus 0, the norm a BN alone plus 0; then an MLP whose
    last 1x1 conv is scaled per channel through an eval-mode dropout."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.mixer = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                                   nn.BatchNorm2d(channels))
        self.mixer_identity, self.norm = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.layer_scale = nn.Parameter(torch.linspace(0.5, 1.5, channels).reshape(channels, 1, 1))
        self.fc1, self.fc2 = nn.Conv2d(channels, 2 * channels, 1), nn.Conv2d(2 * channels, channels, 1)
        self.drop = nn.Dropout(0.1)
        self.mlp_scale = nn.Parameter(torch.linspace(1.5, 0.5, channels).reshape(channels, 1, 1))
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        x = self.stem(x)
        mixed = self.mixer(x) + self.mixer_identity(x) + 0
        x = x + self.layer_scale * (mixed - (self.norm(x) + 0))
        x = x + self.mlp_scale * self.drop(self.fc2(torch.relu(self.fc1(x))))
        return self.head(x.mean((2, 3)))


def _ops(graph_module) -> dict:
    found: dict = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_function":
            found[node.target] = found.get(node.target, 0) + 1
    return found


def test_a_repmixer_becomes_one_depthwise_conv_exactly():
    model = populated(RepMixer(), (3, 16, 16))
    folded, _ = for_quantization(capture(model, (3, 16, 16)).graph_module)
    ops = _ops(folded)
    # stem, the mixer (three branches, the difference and the scale in one), fc1, fc2 (its scale folded in)
    assert ops[aten.conv2d.default] == 4, ops
    assert not {aten.sub.Tensor, aten.mul.Tensor, aten.dropout.default} & set(ops), ops
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_the_merged_model_runs_in_integer_kernels(tmp_path):
    model = populated(RepMixer(), (3, 16, 16))
    result = zeroquant.quantize(model, tmp_path / "m.onnx", input_shape=(3, 16, 16), **FAST)
    census = result.report.census
    assert census["float_ops"] == {} and census["integer_mac_fraction"] == 1.0, census
    assert [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node].count("Conv") == 4
    assert result.report.parity["relative_max_diff"] < 0.02


class NotOneConv(nn.Module):
    """Sums that are not merged: branches of different inputs, a branch read twice, a dilated or an even kernel, a
    product of two branches, and the input plus a conv of it (a residual: the identity stays out of the kernel)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.even, self.even_too = nn.Conv2d(4, 4, 2), nn.Conv2d(4, 4, 2)

    def forward(self, x):
        other_input = self.a(x) + self.b(torch.relu(x))
        read_twice = self.b(x)
        shared = read_twice + self.c(x)
        return (other_input.sum() + shared.sum() + read_twice.sum() + (self.dilated(x) + self.c(x)).sum() +
                (self.even(x) + self.even_too(x)).sum() + (self.a(x) * self.b(x)).sum() + (x + self.c(x)).sum())


def test_sums_that_are_not_one_conv_are_left_alone():
    model = NotOneConv().eval()
    graph_module = capture(model, (4, 8, 8)).graph_module
    before = _ops(graph_module)
    folded, _ = for_quantization(graph_module)
    after = _ops(folded)
    for op in (aten.conv2d.default, aten.add.Tensor):
        assert after[op] == before[op], op
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)


class Untrained(nn.Module):
    """HGNetV2's learnable affine block as initialised (scale 1, offset 0), and x / 1.0 and 0 + x."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.scale, self.offset = nn.Parameter(torch.tensor([1.0])), nn.Parameter(torch.tensor([0.0]))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.scale * self.conv(x) + self.offset
        return self.head(0 + (x / 1.0).mean((2, 3)))


def test_arithmetic_that_leaves_its_input_is_dropped(tmp_path):
    """onnxruntime drops x * 1 and x + 0 from a float graph; quantized, each was a QLinearMul / QLinearAdd (62 on
    hgnetv2_b0, 0.87 ms of its 4.5)."""
    model = populated(Untrained(), (3, 16, 16))
    folded, _ = for_quantization(capture(model, (3, 16, 16)).graph_module)
    assert not {aten.mul.Tensor, aten.add.Tensor, aten.div.Tensor} & set(_ops(folded)), _ops(folded)
    zeroquant.quantize(model, tmp_path / "u.onnx", input_shape=(3, 16, 16), **FAST)
    ops = {n.op_type for n in onnx.load(tmp_path / "u.onnx").graph.node}
    assert not {"Mul", "Add", "Div"} & ops, ops


class Pools(nn.Module):
    """ResNeSt's pools: 3x3 stride 2 with padding counted, 2x2 stride 2 with ceil_mode on an even size (no partial
    window); EfficientFormer's, padding not counted (a conv times a count factor); and a partial window from
    ceil_mode, which is not a conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv(x)
        x = F.avg_pool2d(x, 3, 2, 1) + F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
        y = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        partial = F.avg_pool2d(x[..., :7, :7], 2, 2, ceil_mode=True)
        return self.head((x + y).mean((2, 3)) + partial.mean((2, 3)))


def test_average_pools_that_equal_a_depthwise_conv_become_one(tmp_path):
    """onnxruntime's QLinearAveragePool measured 12x slower than the int8 depthwise conv computing the same pool
    (4x with the count factor's QLinearMul after it)."""
    model = populated(Pools(), (3, 16, 16))
    folded, _ = for_quantization(capture(model, (3, 16, 16)).graph_module)
    ops = _ops(folded)
    assert ops[aten.avg_pool2d.default] == 1 and ops[aten.conv2d.default] == 1 + 3, ops
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)  # 3x3 count factors 1, 1.5, 2.25: exact quarters
    result = zeroquant.quantize(model, tmp_path / "p.onnx", input_shape=(3, 16, 16), **FAST)
    census = result.report.census
    ops = census["op_counts"]
    assert (ops["QLinearConv"], ops["QLinearAveragePool"]) == (4, 1) and ops["QLinearMul"] >= 1, ops
    assert census["float_ops"] == {}, census  # the count factor is a uint8 constant: QLinearMul, no float Mul


def test_a_constant_is_read_as_uint8_only_where_a_grid_holds_it_exactly():
    """A layer scale of 1e-5 is not 0 steps of 1; 3x3 count factors are quarters; 25 / 9 needs ninths."""
    assert uint8_step(torch.full((4,), 1e-5)) is None and uint8_step(torch.tensor([-1.0, 1.0])) is None
    assert uint8_step(torch.tensor([1.0, 1.5, 2.25])) == 0.25
    assert uint8_step(torch.tensor([25 / 9, 1.0])) == pytest.approx(1 / 9)
    assert uint8_step(torch.tensor([300.0])) is None
