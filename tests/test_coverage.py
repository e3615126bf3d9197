"""Any CNN a user brings (issue 12): archives saved with a bounded or fixed batch, dict outputs, and every op
handler that keeps an op out of float, each run in onnxruntime against the simulation and the float model; and a
fast subset of benchmarks/coverage.py on torchvision families with random weights."""

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import zeroquant
from tests.conftest import make_small_net
from zeroquant.cli.app import main
from zeroquant.census import KEPT_FLOAT
from zeroquant.graph.capture import capture
from zeroquant.graph.decompose import for_quantization
from zeroquant.graph.ops import aten
from zeroquant.runtime import run_all, session

FAST = dict(images=8, batch_size=8, iterations=3)


def populated(model: nn.Module, shape, passes: int = 3) -> nn.Module:
    """BN statistics from a few training-mode passes over noise, as a trained model would have them."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(8, *shape))
    return model.eval()


def test_bounded_and_fixed_batch_archives_give_the_same_file(tmp_path):
    model, x = make_small_net(), torch.randn(4, 3, 16, 16)
    forms = {"unbounded": (x[:2], {0: Dim("batch")}), "bounded": (x[:2], {0: Dim("batch", min=1, max=1024)}),
             "fixed1": (x[:1], None), "fixed4": (x, None)}
    files = {}
    for name, (example, dynamic) in forms.items():
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=(dynamic,) if dynamic else None),
                          tmp_path / f"{name}.pt2")
        files[name] = zeroquant.quantize(tmp_path / f"{name}.pt2", **FAST).onnx
    assert len(set(files.values())) == 1, "every archive form gives the same ONNX bytes"
    outputs = run_all(session(files["fixed1"]), np.random.default_rng(0).standard_normal((3, 3, 16, 16), np.float32))
    assert outputs[0].shape == (3, 5)  # the fixed-batch archive's file takes any batch


class TwoHeads(nn.Module):
    """A segmentation-style model: a dict of two dense maps, as torchvision's segmentation models return."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.out, self.aux = nn.Conv2d(8, 5, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = self.body(x)
        return {"out": F.interpolate(self.out(y), size=x.shape[-2:], mode="nearest"), "aux": self.aux(y)}


def test_dict_outputs_are_named_and_checked(tmp_path, capsys):
    model = populated(TwoHeads(), (3, 16, 16))
    result = zeroquant.quantize(model, tmp_path / "seg.onnx", input_shape=(3, 16, 16), **FAST)
    assert result.report.outputs == ["out", "aux"] and set(result.report.parity["outputs"]) == {"out", "aux"}
    ort_session = session(tmp_path / "seg.onnx")
    assert [o.name for o in ort_session.get_outputs()] == ["out", "aux"]
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16), np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
    for name, got in zip(["out", "aux"], run_all(ort_session, x)):
        assert got.shape == tuple(expected[name].shape)
        reference = expected[name].numpy()
        assert np.sqrt(np.mean((got - reference) ** 2)) < 0.1 * np.sqrt(np.mean(reference ** 2))
    assert result.report.census["integer_mac_fraction"] == 1.0
    assert main(["eval", str(tmp_path / "seg.onnx"), "--preprocess", "cifar10", "--data", str(tmp_path)]) == 2
    assert "eval measures classifiers (one [batch, classes] output)" in capsys.readouterr().err


class Handlers(nn.Module):
    """One of each op the export keeps out of float: SiLU, hardswish, an SE gate (hardsigmoid), a channel split
    with shuffle and concat, a pre-activation BatchNorm, scalar arithmetic, a learnable one-element scale and offset
    (HGNetV2's affine blocks: parameters, written c * x) and a nearest upsampling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.Hardswish())
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1),
                                     nn.Hardsigmoid())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.preact = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1))
        self.head = nn.Linear(16, 6)
        self.scale, self.offset = nn.Parameter(torch.tensor([0.8])), nn.Parameter(torch.tensor([0.1]))

    def forward(self, x):
        x = self.scale * self.expand(self.stem(x)) + self.offset
        x = x * self.squeeze(x)
        left, right = x.chunk(2, dim=1)
        x = torch.cat([left, self.branch(right)], 1)
        x = x.view(x.size(0), 2, 8, *x.shape[2:]).transpose(1, 2).reshape(x.size(0), 16, *x.shape[2:])
        x = F.relu6(x * 0.5 + 1.0) / 6
        x = F.interpolate(self.preact(x), scale_factor=2, mode="nearest")
        return self.head(x.mean((2, 3)))


def test_every_handler_runs_in_integer_kernels(tmp_path):
    model = populated(Handlers(), (3, 16, 16))
    result = zeroquant.quantize(model, tmp_path / "h.onnx", input_shape=(3, 16, 16),
                                float_output=tmp_path / "fp32.onnx", **FAST)
    census = result.report.census
    assert census["float_ops"] == {} and census["integer_mac_fraction"] == 1.0, census
    ops = census["op_counts"]
    for op in ("QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearConcat", "Split", "QLinearGlobalAveragePool"):
        assert ops.get(op), (op, ops)
    assert result.report.float_ops == []
    assert any("depthwise 1x1 conv" in note for note in result.report.notes)
    x = np.random.default_rng(1).standard_normal((16, 3, 16, 16), np.float32)
    quantized, reference = run_all(session(tmp_path / "h.onnx"), x)[0], run_all(session(tmp_path / "fp32.onnx"), x)[0]
    assert np.abs(quantized - reference).max() < 0.1 * np.abs(reference).max()


class Detector(nn.Module):
    """A detection head's output: boxes in pixels (hundreds) joined with class scores in [0, 1] along channels."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.boxes = nn.Conv2d(16, 4, 1)
        self.scores = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        y = self.body(x)
        return torch.cat([300 + 100 * self.boxes(y), torch.sigmoid(self.scores(y))], 1).flatten(2)


def test_a_float_output_concat_keeps_each_inputs_own_grid(tmp_path):
    """One uint8 grid for boxes and scores (step ~1.7) rounds every score to 0 or one step; the concat and the
    flatten after it run in float on the model's output anyway, so each input keeps its own quantizer."""
    model = populated(Detector(), (3, 16, 16))
    zeroquant.quantize(model, tmp_path / "det.onnx", input_shape=(3, 16, 16), **FAST)
    x = np.random.default_rng(2).uniform(-1.5, 1.5, (4, 3, 16, 16)).astype(np.float32)  # within the input's range
    got = run_all(session(tmp_path / "det.onnx"), x)[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    scores, reference = got[:, 4:], expected[:, 4:]
    assert np.abs(scores - reference).max() < 0.03 * (reference.max() - reference.min())
    assert np.abs(got[:, :4] - expected[:, :4]).max() < 0.03 * (expected[:, :4].max() - expected[:, :4].min())


def test_hardswish_export_equals_the_simulation():
    """x + 3 quantized with six times the scale is hardsigmoid on the grid it is read with: the file and the
    simulation agree to rounding on every image, not only on average."""
    model = populated(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardswish(), nn.Conv2d(8, 8, 1),
                                    nn.BatchNorm2d(8), nn.Hardsigmoid(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4)),
                      (3, 16, 16))
    result = zeroquant.quantize(model, input_shape=(3, 16, 16), **FAST)
    assert result.report.census["float_ops"] == {}
    assert result.report.parity["relative_max_diff"] < 0.02 and result.report.parity["top1_agreement"] == 100


class TwoSwishes(nn.Module):
    """Two hardswish activations: one over a conv whose outputs reach far below -3, one whose outputs stay within
    +-0.3 (all in hardsigmoid's linear part)."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish())
        self.narrow = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Hardswish())
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.narrow(self.wide(x)))


def _gate_ops(path) -> dict[str, int]:
    """How the file writes its hardsigmoids: Clips of a uint8 tensor (the gate on the input's grid) and Adds."""
    graph = onnx.load(path).graph
    return {op: sum(n.op_type == op for n in graph.node) for op in ("Clip", "Add", "HardSigmoid")}


@pytest.mark.parametrize("low_bit", [False, True])
def test_a_hardswish_whose_input_reaches_minus_three_gates_with_a_clip(tmp_path, low_bit):
    """Where x's grid reaches -3, hardsigmoid(x) is x's uint8 tensor clipped to [-3, 3] and read with a sixth of the
    scale (onnxruntime: one Clip, half the time of a QLinearAdd); x's step is anchored so that -3 lies on the grid,
    also after reconstruction learns it. A tensor within +-0.3 keeps its resolution and its QLinearAdd."""
    torch.manual_seed(0)
    model = populated(TwoSwishes(), (3, 16, 16))
    model.wide[1].running_var.mul_(1e-2)  # ten times the spread: far beyond +-3
    model.narrow[1].running_var.mul_(1e4)  # a hundredth of it: within +-0.3
    options = dict(wbits=4, reconstruct="on", effort="fast") if low_bit else {}
    result = zeroquant.quantize(model, tmp_path / "s.onnx", input_shape=(3, 16, 16), **FAST, **options)
    assert _gate_ops(tmp_path / "s.onnx") == {"Clip": 1, "Add": 1, "HardSigmoid": 0}
    report = result.report
    assert report.census["float_ops"] == {} and report.census["integer_mac_fraction"] == 1.0
    # the gate is exact, so the file equals the simulation (a gate read with s / 5 instead of s / 6 gives 0.004)
    assert report.parity["relative_max_diff"] < 1e-3 and report.parity["top1_agreement"] == 100, report.parity


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v2_x0_5", "efficientnet_b0", "densenet121"])
def test_torchvision_families_quantize_to_integer_kernels(name, tmp_path):
    """The fast subset of benchmarks/coverage.py: random weights, populated BN statistics, 64 px."""
    torchvision = pytest.importorskip("torchvision")
    model = populated(getattr(torchvision.models, name)(weights=None), (3, 64, 64), passes=2)
    result = zeroquant.quantize(model, tmp_path / "m.onnx", input_shape=(3, 64, 64), **FAST)
    census = result.report.census
    assert census["integer_mac_fraction"] >= 0.99 and census["float_ops"] == {}, census
    written = json.loads((tmp_path / "m.onnx.json").read_text())
    assert written["float_ops"] == [] and onnx.load(tmp_path / "m.onnx").graph.output[0].name == "logits"


class TokenLinear(nn.Module):
    """A conv feature map read as tokens by a Linear, as MobileViT's transformer blocks do ([batch, tokens, C])."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Linear(8, 8)

    def forward(self, x):
        x = self.stem(x)
        tokens = self.mix(x.flatten(2).transpose(1, 2))
        return tokens.mean(1)


def test_linear_over_tokens_gets_its_bias_corrected():
    """Bias correction measured a Linear's shift per token as well as per channel ([tokens, C] into a [C] bias):
    mobilevit_xxs crashed with 'output with shape [192] doesn't match the broadcast shape [64, 192]'."""
    model = populated(TokenLinear(), (3, 16, 16))
    result = zeroquant.quantize(model, input_shape=(3, 16, 16), bias_correction="on", **FAST)
    assert result.report.parity["relative_max_diff"] < 0.02


def test_linear_over_tokens_runs_in_an_integer_gemm(tmp_path):
    """A Linear on [batch, tokens, C] was exported as MatMul + Add, which onnxruntime ran as MatMulIntegerToFloat
    with a float bias Add, dequantize and requantize (levit_128s: 17.7 % integer MACs by the census). Flattened
    to [batch * tokens, C] around it, it is the QGemm of a 2-D Linear: int32 bias, uint8 output."""
    model = populated(TokenLinear(), (3, 16, 16))
    result = zeroquant.quantize(model, tmp_path / "t.onnx", input_shape=(3, 16, 16), **FAST)
    census = result.report.census
    assert census["integer_mac_fraction"] == 1.0 and census["float_ops"] == {}, census
    assert census["op_counts"].get("QGemm") == 1 and "MatMulIntegerToFloat" not in census["op_counts"], census
    assert "MatMul" not in {n.op_type for n in onnx.load(tmp_path / "t.onnx").graph.node}
    assert result.report.parity["relative_max_diff"] < 0.02 and result.report.parity["top1_agreement"] == 100


class TokenAttention(nn.Module):
    """Self-attention over a conv feature map's tokens through F.scaled_dot_product_attention, as timm's attention
    blocks (MobileViT's among them) call it; `mask` adds a float bias to the scores, `scale` replaces 1/sqrt(d)."""

    def __init__(self, dim: int = 16, heads: int = 2, mask: bool = False, scale: float | None = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.ReLU())
        self.qkv, self.proj, self.heads, self.scale = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads, scale
        self.bias = nn.Parameter(torch.randn(heads, 64, 64)) if mask else None

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        b, n, c = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, scale=self.scale)
        return self.proj(mixed.transpose(1, 2).reshape(b, n, c)).mean(1)


@pytest.mark.parametrize("options", [{}, {"mask": True, "scale": 0.3}])
def test_attention_is_written_out_exactly(options):
    """The decomposition of scaled_dot_product_attention computes the fused op (float mask and scale included)."""
    torch.manual_seed(0)
    model = populated(TokenAttention(**options), (3, 16, 16))
    folded, _ = for_quantization(capture(model, (3, 16, 16)).graph_module)
    assert aten.scaled_dot_product_attention.default not in {n.target for n in folded.graph.nodes}
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_attention_runs_in_integer_kernels(tmp_path):
    """A fused scaled_dot_product_attention was one float island (MatMul, Softmax, MatMul; mobilevit_xxs had 9 of
    each). Written out, q K^T runs as MatMulIntegerToFloat (its float result feeds the softmax, which stays float:
    QLinearSoftmax measured 6x slower), attention x V as QLinearMatMul, the scale as QLinearMul; the census names
    the float Softmax, and the file matches the simulation."""
    torch.manual_seed(0)
    model = populated(TokenAttention(), (3, 16, 16))
    result = zeroquant.quantize(model, tmp_path / "a.onnx", input_shape=(3, 16, 16), **FAST)
    census = result.report.census
    assert census["float_ops"] == {"Softmax": 1} and census["integer_mac_fraction"] == 1.0, census
    assert len(census["integer_products"]) == 2 and census["float_products"] == [], census
    products = 2 * (2 * 64 * 64 * 8)  # two products over 2 heads of 64 tokens, 8 channels each
    layers = sum(layer.macs for layer in result.report.layers)
    assert census["total_macs"] == census["integer_macs"] == layers + products, census
    assert "Softmax x1: " + KEPT_FLOAT["Softmax"] in result.report.float_ops
    for op in ("MatMulIntegerToFloat", "QLinearMatMul", "QLinearMul"):
        assert census["op_counts"].get(op) == 1, census["op_counts"]
    assert "QLinearSoftmax" not in census["op_counts"]
    assert result.report.parity["relative_max_diff"] < 0.02 and result.report.parity["top1_agreement"] == 100


class LinearAttention(nn.Module):
    """EfficientViT's ReLU linear attention (timm efficientvit_b0, LiteMLA): q (K^T V), computed in a region with
    autocast off, which torch.export captures as a subgraph (a higher-order op reading a GraphModule attribute)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.ReLU())
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(self.stem(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        with torch.autocast("cpu", enabled=False):
            mixed = F.relu(q) @ (F.relu(k).transpose(-1, -2) @ v)
        return self.proj(mixed).mean(1)


def test_attention_in_an_autocast_region_runs_in_integer_kernels():
    """efficientvit_b0 failed at capture ('GraphModule' object has no attribute 'detach'): the constant folding
    read the autocast region's subgraph as a tensor. Once captured, the region's products stayed float (no pass
    looked into the subgraph); inlined, both run in integer kernels and the file matches the simulation."""
    torch.manual_seed(0)
    result = zeroquant.quantize(populated(LinearAttention(), (3, 16, 16)), input_shape=(3, 16, 16), **FAST)
    census = result.report.census
    assert len(census["integer_products"]) == 2 and census["float_products"] == [], census
    assert census["integer_mac_fraction"] == 1.0 and census["float_ops"] == {}, census
    assert result.report.parity["relative_max_diff"] < 0.02


class StandardisedConv(nn.Conv2d):
    """A weight-standardised conv as NF-ResNets (timm nf_resnet26, StdConv2d) write it: F.batch_norm over each
    output channel's weights in training mode, at every call, with no BatchNorm layer in the network."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


def test_weight_standardised_convs_are_convs_without_batchnorm(tmp_path, capsys):
    """The batch_norm of a conv's own weights is computed once at capture: an archive of the eval-mode model is not
    'exported in training mode', distillation says the model has no BatchNorm, and noise calibration quantizes it
    with every conv in an integer kernel, matching the float model."""
    torch.manual_seed(0)
    model = nn.Sequential(StandardisedConv(3, 8, 3, padding=1), nn.ReLU(), StandardisedConv(8, 8, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    archive = tmp_path / "ws.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 16, 16),),
                                          dynamic_shapes=({0: Dim("batch")},)), archive)
    assert main(["quantize", str(archive), "-o", str(tmp_path / "ws.onnx")]) == 4
    assert "no BatchNorm layers" in capsys.readouterr().err
    result = zeroquant.quantize(archive, tmp_path / "ws.onnx", method="noise", float_output=tmp_path / "fp32.onnx",
                                **FAST)
    assert result.report.census["integer_mac_fraction"] == 1.0 and result.report.census["float_ops"] == {}
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16), np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    for path in ("fp32.onnx", "ws.onnx"):
        got = run_all(session(tmp_path / path), x)[0]
        assert np.abs(got - expected).max() < (1e-4 if path == "fp32.onnx" else 0.1) * np.abs(expected).max()


class LinearNorms(nn.Module):
    """BatchNorm after Linear layers: BatchNorm1d on [batch, features] and, as LeViT writes it, on the tokens of
    [batch, tokens, features] flattened to [batch * tokens, features]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.mix, self.mix_bn = nn.Linear(16, 32), nn.BatchNorm1d(32)
        self.head, self.head_bn = nn.Linear(32, 10), nn.BatchNorm1d(10)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        mixed = self.mix(tokens)
        tokens = self.mix_bn(mixed.flatten(0, 1)).reshape_as(mixed)
        return self.head_bn(self.head(F.relu(tokens).mean(1)))


def test_batchnorm_after_linear_is_folded_into_it(tmp_path):
    """No float BatchNormalization is left (issue 22: LeViT kept 47), and the file matches the float model."""
    model = populated(LinearNorms(), (3, 16, 16))
    result = zeroquant.quantize(model, tmp_path / "l.onnx", input_shape=(3, 16, 16),
                                float_output=tmp_path / "fp32.onnx", **FAST)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(tmp_path / "l.onnx").graph.node}
    assert "BatchNormalization" not in result.report.census["float_ops"]
    x = np.random.default_rng(0).standard_normal((16, 3, 16, 16), np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(run_all(session(tmp_path / "fp32.onnx"), x)[0] - expected).max() < 1e-4 * np.abs(expected).max()
    got = run_all(session(tmp_path / "l.onnx"), x)[0]
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()


class NormLinearHead(nn.Module):
    """LeViT's head: the mean over tokens, BatchNorm1d, dropout, Linear (a BN before a Linear, no layer before it)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.mix = nn.Linear(16, 24)
        self.head = nn.Sequential(nn.BatchNorm1d(24), nn.Dropout(0.1), nn.Linear(24, 10))

    def forward(self, x):
        return self.head(self.mix(self.stem(x).flatten(2).transpose(1, 2)).mean(1))


def test_batchnorm_before_linear_is_folded_into_it(tmp_path):
    """levit_128s kept one float BatchNormalization (its heads' BN on [batch, C], read only by a Linear): folded into
    the Linear's input columns it leaves no BN, and the float graph computes what the model computes."""
    model = populated(NormLinearHead(), (3, 16, 16))
    folded, unfolded = for_quantization(capture(model, (3, 16, 16)).graph_module)
    assert unfolded == 0 and aten.batch_norm.default not in {n.target for n in folded.graph.nodes}
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    result = zeroquant.quantize(model, tmp_path / "n.onnx", input_shape=(3, 16, 16), **FAST)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(tmp_path / "n.onnx").graph.node}
    assert result.report.census["integer_mac_fraction"] == 1.0 and result.report.parity["relative_max_diff"] < 0.02


def test_reshapes_of_reshapes_are_merged(tmp_path):
    """The Linear on tokens is flattened to 2-D and back around its Gemm, and LeViT's folded BatchNorm leaves a
    flatten and a reshape_as after it: four Reshapes in a row (with Q/DQ pairs between), each one a node onnxruntime
    runs (levit_128s: 109 such chains). One is left, and the file matches the simulation (the merge is exact)."""
    torch.manual_seed(0)
    model = populated(LinearNorms(), (3, 16, 16))
    result = zeroquant.quantize(model, tmp_path / "l.onnx", input_shape=(3, 16, 16), **FAST)
    nodes = onnx.load(tmp_path / "l.onnx").graph.node
    producer = {out: node for node in nodes for out in node.output}
    for reshape in [n for n in nodes if n.op_type == "Reshape"]:
        source = producer.get(reshape.input[0])
        while source is not None and source.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip"):
            source = producer.get(source.input[0])
        assert source is None or source.op_type != "Reshape", reshape.name
    assert [n.op_type for n in nodes].count("Reshape") == 3  # flatten(2), the Linear's input, its output
    assert result.report.parity["relative_max_diff"] < 0.02


class Gate(nn.Module):
    """An SE-style hardsigmoid gate over a conv whose output is exactly 0 wherever the image is: hardsigmoid(0) =
    0.5, half way between two steps of the [0, 1] / 255 grid."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False),
                                  nn.Hardsigmoid())
        self.value = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.value(x) * self.gate(x))


def test_hardsigmoid_of_zero_is_no_rounding_tie():
    """fbnetv3_b's divergence: onnxruntime's QLinearAdd rounded hardsigmoid(0) = 127.5 steps down, the simulation
    up, on every element at the zero point. The gate's grid now holds 0.5 exactly and the file equals the
    simulation."""
    torch.manual_seed(0)
    model = populated(Gate(), (3, 16, 16))
    model.gate[1].running_mean.zero_()
    model.gate[1].running_var.fill_(1e-2)  # exactly 0 on a zero image; beyond +-3 (saturated) on most others
    images = torch.randn(16, 3, 16, 16)
    images[:, :, :8] = 0.0
    result = zeroquant.quantize(model, input_shape=(3, 16, 16), calibration=images)
    assert result.report.census["float_ops"] == {}
    assert result.report.parity["max_abs_logit_diff"] == 0.0, result.report.parity


@pytest.mark.parametrize("name", ["lcnet_050", "mobilevit_xxs"])
def test_timm_families_quantize(name):
    """The fast subset of benchmarks/coverage.py's timm section (random weights, populated BN statistics, 64 px): a
    plain CNN all in integer kernels, and a CNN-attention hybrid (Linear layers on tokens) through with parity."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = populated(timm.create_model(name, pretrained=False), (3, 64, 64), passes=2)
    result = zeroquant.quantize(model, input_shape=(3, 64, 64), **FAST)
    census = result.report.census
    assert result.report.parity["relative_max_diff"] < 0.1
    if name == "lcnet_050":
        assert census["integer_mac_fraction"] >= 0.99 and census["float_ops"] == {}, census
    else:  # Linears on tokens and attention's products integer; LayerNorm (no kernel), Softmax (slower) float
        assert census["integer_mac_fraction"] >= 0.99 and census["float_products"] == [], census
        assert set(census["float_ops"]) <= {"LayerNormalization", "Softmax", "Resize"}, census
