"""Narrow channel counts padded to a multiple of 16 (export/channel_padding.py): exact, and only where every op
touching the tensors can take zero channels."""

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import zeroquant
from tests.test_coverage import FAST, populated
from zeroquant.export.channel_padding import pad_channels, pad_image_channels
from zeroquant.runtime import run_all, session


class QdqGraph:
    """A QDQ graph as zeroquant writes one: uint8 per-tensor activations, int8 per-channel weights, int32 biases."""

    def __init__(self, channels: int):
        self.rng, self.nodes, self.inits, self.count = np.random.default_rng(0), [], [], 0
        self.weights: list[str] = []  # each conv's weight initializer, in order
        self.constant("scale", np.array(0.05, np.float32))
        self.constant("zero", np.array(128, np.uint8))
        self.input = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, 12, 12])
        self.output_channels = channels

    def constant(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        self.count += 1
        output = f"{op.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def requantize(self, x: str) -> str:
        return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, "scale", "zero"]), "scale", "zero"])

    def conv(self, x: str, cin: int, cout: int, kernel: int = 1, depthwise: bool = False) -> str:
        tag = f"conv{len(self.weights)}"
        self.weights.append(f"{tag}.weight")
        weight = self.rng.integers(-127, 128, (cout, 1 if depthwise else cin, kernel, kernel)).astype(np.int8)
        weight_scale = (self.rng.random(cout) * 0.01 + 0.002).astype(np.float32)
        w = self.node("DequantizeLinear", [self.constant(f"{tag}.weight", weight),
                                           self.constant(f"{tag}.scale", weight_scale),
                                           self.constant(f"{tag}.zero", np.zeros(cout, np.int8))], axis=0)
        b = self.node("DequantizeLinear", [self.constant(f"{tag}.bias", self.rng.integers(-500, 500, cout, np.int32)),
                                           self.constant(f"{tag}.bias_scale", weight_scale * np.float32(0.05))],
                      axis=0)
        y = self.node("Conv", [x, w, b], group=cout if depthwise else 1, kernel_shape=[kernel, kernel],
                      pads=[kernel // 2] * 4)
        return self.requantize(y)

    def model(self, output: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "padding", [self.input],
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, self.output_channels, 12, 12])],
                                  self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def mobile_block() -> onnx.ModelProto:
    """conv0: pointwise 8 -> 12, hard-swish, conv1: depthwise 12, squeeze-excite (conv2: 12 -> 4, conv3: 4 -> 12,
    sigmoid gate), a residual add of two 12-channel tensors, conv4: pointwise 12 -> 8; beside it conv5, a
    12-channel branch that a Concat reads, and conv6 after the Concat."""
    g = QdqGraph(8)
    x = g.requantize("input")
    expand = g.conv(x, 8, 12)
    three = g.node("DequantizeLinear", [g.constant("three", np.array(255, np.uint8)),
                                        g.constant("three_scale", np.array(3 / 255, np.float32))])
    gate = g.requantize(g.node("Add", [expand, three]))
    swished = g.requantize(g.node("Mul", [expand, gate]))
    depthwise = g.conv(swished, 12, 12, kernel=3, depthwise=True)
    squeezed = g.requantize(g.node("GlobalAveragePool", [depthwise]))
    excite = g.conv(g.conv(squeezed, 12, 4), 4, 12)
    gated = g.requantize(g.node("Mul", [depthwise, g.requantize(g.node("Sigmoid", [excite]))]))
    block = g.conv(g.requantize(g.node("Add", [gated, expand])), 12, 8)
    joined = g.node("Concat", [block, g.conv(x, 8, 12)], axis=1)
    return g.model(g.conv(joined, 20, 8))


def conv_widths(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(output channels, group) of each conv, by the name of its weight initializer."""
    producer = {out: node for node in model.graph.node for out in node.output}
    inits = {init.name: init for init in model.graph.initializer}
    widths = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            weight = inits[producer[node.input[1]].input[0]]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            widths[weight.name] = (weight.dims[0], group)
    return widths


def test_narrow_channels_are_padded_exactly():
    model = mobile_block()
    padded = onnx.ModelProto()
    padded.CopyFrom(model)
    assert pad_channels(padded) == 2  # the 12-channel block with its residual and gate, and the squeeze's 4
    onnx.checker.check_model(padded, full_check=True)
    widths = conv_widths(padded)
    assert widths["conv0.weight"] == (16, 1)  # the expand conv writes 16 channels
    assert widths["conv1.weight"] == (16, 16)  # the depthwise conv runs 16 groups
    assert widths["conv2.weight"] == (16, 1) and widths["conv3.weight"] == (16, 1)  # squeeze 4 -> 16, excite
    assert widths["conv4.weight"] == (8, 1) and widths["conv6.weight"] == (8, 1)
    assert widths["conv5.weight"] == (12, 1), "a tensor a Concat reads keeps its width"
    x = np.random.default_rng(1).standard_normal((4, 8, 12, 12)).astype(np.float32)
    before, after = run_all(session(model), x)[0], run_all(session(padded), x)[0]
    assert np.array_equal(before, after), "zero channels change no output"


def spatial_gate(reader_zero_point: int = 0) -> onnx.ModelProto:
    """conv0: 8 -> 12, a one-channel sigmoid gate (conv1: 12 -> 1) broadcast over the 12 channels, conv2: 12 -> 8,
    whose int8 weights have the given zero point."""
    g = QdqGraph(8)
    features = g.conv(g.requantize("input"), 8, 12)
    gate = g.requantize(g.node("Sigmoid", [g.conv(features, 12, 1)]))
    model = g.model(g.conv(g.requantize(g.node("Mul", [features, gate])), 12, 8))
    for init in model.graph.initializer:
        if init.name == "conv2.zero":
            init.CopyFrom(numpy_helper.from_array(np.full(8, reader_zero_point, np.int8), init.name))
    return model


def test_a_spatial_gate_keeps_its_one_channel_and_odd_zero_points_block_padding():
    x = np.random.default_rng(1).standard_normal((4, 8, 12, 12)).astype(np.float32)
    for zero_point, groups in ((0, 1), (3, 0)):  # a nonzero weight zero point: a zero weight would not read 0
        model, padded = spatial_gate(zero_point), spatial_gate(zero_point)
        assert pad_channels(padded) == groups
        onnx.checker.check_model(padded, full_check=True)
        widths = conv_widths(padded)
        assert widths["conv1.weight"] == (1, 1) and widths["conv0.weight"] == ((16, 1) if groups else (12, 1))
        assert np.array_equal(run_all(session(model), x)[0], run_all(session(padded), x)[0])


def stem(also_read: bool) -> onnx.ModelProto:
    """A colour image into a 3x3 stem conv (3 -> 16) and a pointwise conv back to 3; with `also_read`, a residual
    add reads the quantized image too."""
    g = QdqGraph(3)
    image = g.requantize("input")
    out = g.conv(g.conv(image, 3, 16, kernel=3), 16, 3)
    return g.model(g.requantize(g.node("Add", [out, image])) if also_read else out)


def test_the_image_is_padded_to_four_channels_exactly():
    model, padded = stem(also_read=False), stem(also_read=False)
    assert pad_image_channels(padded) == 1
    onnx.checker.check_model(padded, full_check=True)
    assert conv_widths(padded)["conv0.weight"] == (16, 1)
    weights = {init.name: numpy_helper.to_array(init) for init in padded.graph.initializer}
    assert weights["conv0.weight"].shape == (16, 4, 3, 3) and not weights["conv0.weight"][:, 3].any()
    x = np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32)
    assert np.array_equal(run_all(session(model), x)[0], run_all(session(padded), x)[0])
    shared = stem(also_read=True)
    assert pad_image_channels(shared) == 0, "an image that an Add reads too keeps its 3 channels"


class NarrowNet(nn.Module):
    """A 0.5-width mobile block (12 channels, depthwise, residual) and a head conv before the pooled classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(12, 12, 3, 1, 1, groups=12), nn.BatchNorm2d(12), nn.Hardswish(),
                                   nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12))
        self.last = nn.Sequential(nn.Conv2d(12, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.block(y)
        return self.head(self.last(y).mean((2, 3)))


def test_the_export_pads_narrow_nets(tmp_path):
    torch.manual_seed(0)
    model = populated(NarrowNet(), (3, 32, 32))
    result = zeroquant.quantize(model, tmp_path / "narrow.onnx", input_shape=(3, 32, 32), **FAST)
    widths = conv_widths(onnx.load(tmp_path / "narrow.onnx"))
    assert widths["block_0.weight"] == (16, 16)
    weights = {init.name: numpy_helper.to_array(init) for init in onnx.load(tmp_path / "narrow.onnx").graph.initializer}
    assert weights["stem_0.weight"].shape == (16, 4, 3, 3), "the stem writes 16 channels and reads 4"
    assert any("1 channel(s) to a multiple of 4" in note for note in result.report.notes)
    assert result.report.parity["relative_max_diff"] < 0.02
    assert result.report.census["integer_mac_fraction"] == 1.0
    zeroquant.quantize(model, tmp_path / "as-is.onnx", input_shape=(3, 32, 32), pad_channels=False, **FAST)
    assert conv_widths(onnx.load(tmp_path / "as-is.onnx"))["block_0.weight"] == (12, 12)
    x = np.random.default_rng(2).standard_normal((8, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(run_all(session(tmp_path / "narrow.onnx"), x)[0],
                          run_all(session(tmp_path / "as-is.onnx"), x)[0]), "padding changes no output"
