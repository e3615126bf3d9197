"""Low bit-widths: graph-derived blocks, block reconstruction, and the b-bit grids inside the int8/uint8 ONNX."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.conftest import make_small_net
from zeroquant.graph.batchnorm import fold_batchnorm
from zeroquant.graph.capture import capture
from zeroquant.options import QuantizeOptions
from zeroquant.runtime import predict, session
from zeroquant.pipeline import quantize
from zeroquant.quant.reconstruct import EFFORTS, Effort, find_blocks
from zeroquant.quant.sim import build_quantsim
from zeroquant.zoo.loading import LoadedModel

FAST = dict(images=16, batch_size=16, iterations=200, effort="fast")  # 200: the default steps at 16 px


def test_blocks_follow_the_graph():
    captured = capture(make_small_net(), (3, 16, 16))
    sim = build_quantsim(fold_batchnorm(captured.graph_module)[0], 4, 4)
    blocks = find_blocks(sim)
    # stem alone; the residual branch and its add form one block; then one block per layer of the plain chain
    assert [b.layers for b in blocks] == [["stem_0"], ["branch_0"], ["depthwise_1"], ["pointwise_0"], ["head"]]
    owned = [q for b in blocks for q in b.quantizers]
    assert len(owned) == len(set(owned))  # every quantizer's step size is learned in exactly one block


class _ViewByBatchSize(torch.nn.Module):
    """Ends in x.view(x.size(0), -1), as EfficientNet-Lite does: torch.export reads the batch size from the input."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.body(x).view(x.size(0), -1))


def test_a_batch_size_read_from_the_input_does_not_merge_all_blocks():
    model = _ViewByBatchSize().eval()
    captured = capture(model, (3, 10, 10))
    x = torch.randn(3, 3, 10, 10)
    torch.testing.assert_close(captured.graph_module(x), model(x))
    blocks = find_blocks(build_quantsim(captured.graph_module, 4, 8))
    assert [len(b.layers) for b in blocks] == [1, 1, 1]


@pytest.mark.parametrize("reconstruct, activation_bits, runs", [
    ("auto", 8, False), ("auto", 4, True), ("auto", 6, True), ("on", 8, True), ("off", 2, False)])
def test_reconstruction_runs_by_default_only_where_it_measured_better(reconstruct, activation_bits, runs):
    """auto: not with 8-bit activations, whatever the weights (Lite0 W4A8 81.6 % GPTQ alone in 4 min, 81.8 %
    reconstructed in 35; ResNet-20 W2A8 75.38 / 75.58 % in 33 / 117 s), but below them (ResNet-20 W4A4 -10.6 ->
    -3.6)."""
    assert QuantizeOptions(reconstruct=reconstruct).reconstructs(activation_bits) is runs


def test_w4a8_by_default_is_gptq_without_reconstruction(tmp_path):
    loaded = LoadedModel(make_small_net(), "small", (3, 16, 16), None, None)
    report = quantize(loaded, tmp_path / "w4a8.onnx", options=QuantizeOptions(wbits=4, **FAST)).report
    assert report.reconstruction == [] and "reconstruct" not in report.timings and report.timings["rounding"] > 0


def test_w4a4_reconstruction_exports_b_bit_grids(tmp_path, monkeypatch):
    monkeypatch.setitem(EFFORTS, "fast", Effort(40, 16))
    out = tmp_path / "w4a4.onnx"
    loaded = LoadedModel(make_small_net(), "small", (3, 16, 16), None, None)
    report = quantize(loaded, out, options=QuantizeOptions(wbits=4, abits=4, **FAST)).report
    assert report.reconstruction, "reconstruction runs by default with activations below 8 bits"
    assert all(b["mse_after"] <= b["mse_before"] for b in report.reconstruction), report.reconstruction
    # on this net the held-out images keep the 4-bit blocks' GPTQ fit (up to 200 steps tried) and the stem's
    # reconstruction (MSE 0.011 -> 0.0012): what is kept lowers the blocks' error
    kept = [b for b in report.reconstruction if b["kept"]]
    assert kept and all(b["mse_after"] < 0.99 * b["mse_before"] for b in kept), report.reconstruction
    model = onnx.load(out)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith(".weight")}
    bits = {layer["name"].replace(".", "_"): layer["weight_bits"] for layer in report.to_dict()["layers"]}
    # first and last layer pinned by --keep-first-last, the depthwise conv by --keep-depthwise (both 8 by default)
    assert bits == {"stem_0": 8, "branch_0": 4, "depthwise_1": 8, "pointwise_0": 4, "head": 8}
    assert any("1 depthwise conv(s) keep 8-bit weights" in note for note in report.notes), report.notes
    for name, values in weights.items():
        assert values.dtype == np.int8
        assert np.abs(values).max() <= 2 ** (bits[name.split(".")[0]] - 1) - 1, name
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert clips, "4-bit activations are clipped to [0, 15] on the uint8 tensor"
    assert report.census["integer_mac_fraction"] == 1.0, report.census
    assert report.parity["top1_agreement"] >= 99


def test_pack_int4_shrinks_the_file_and_keeps_the_integer_kernels(tmp_path, monkeypatch):
    monkeypatch.setitem(EFFORTS, "fast", Effort(5, 16))
    loaded = LoadedModel(make_small_net(), "small", (3, 16, 16), None, None)
    options = dict(wbits=4, abits=8, keep_first_last=0, keep_depthwise=0, **FAST)
    plain = quantize(loaded, tmp_path / "int8.onnx", options=QuantizeOptions(**options)).report
    packed = quantize(loaded, tmp_path / "int4.onnx", options=QuantizeOptions(**options, pack_int4=True)).report
    model = onnx.load(tmp_path / "int4.onnx")
    int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    layers = ("stem_0", "branch_0", "depthwise_1", "pointwise_0", "head")
    assert {i.name for i in int4} == {f"{n}.weight_int4" for n in layers}
    assert packed.sizes["onnx_bytes"] < plain.sizes["onnx_bytes"] - 0.4 * sum(i.dims[0] for i in int4)
    assert packed.census["integer_mac_fraction"] == 1.0 and packed.census["float_ops"] == {}, packed.census
    assert any("still run in integer kernels" in note for note in packed.notes)
    x = np.random.default_rng(1).standard_normal((32, 3, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(predict(session(tmp_path / "int4.onnx"), x),
                                  predict(session(tmp_path / "int8.onnx"), x))  # the same integers, the same kernels


def test_reconstruction_keeps_relu6_grids_within_6(monkeypatch):
    """LSQ may stretch the grid after a ReLU6 past 6; the exported ReLU6 then could not be absorbed and a float Clip
    would stop onnxruntime's QLinearConv fusion. Reconstruction caps such grids at the clamp."""
    from zeroquant.quant.calibrate import calibrate
    from zeroquant.quant.reconstruct import reconstruct

    monkeypatch.setitem(EFFORTS, "fast", Effort(5, 8))
    sim = build_quantsim(fold_batchnorm(capture(make_small_net(), (3, 16, 16)).graph_module)[0], 4, 8)
    images = torch.randn(16, 3, 16, 16)
    calibrate(sim, images)
    after_relu6 = [q for q in sim.activations.values() if q.prior is not None and q.prior.high == 6.0]
    assert len(after_relu6) == 1
    after_relu6[0].set_range(0.0, 9.0)  # as if a step size had been learned too large
    reconstruct(sim, images, "fast")
    assert after_relu6[0].range[1] <= 6.0 + 1e-6


def test_explicit_bits_of_the_first_and_last_layers_are_kept(tmp_path):
    """keep_first_last raised layer_bits' choice for them to 8 without a word; an explicit choice wins, and says so."""
    loaded = LoadedModel(make_small_net(), "small", (3, 16, 16), None, None)
    report = quantize(loaded, options=QuantizeOptions(layer_bits={"stem_0": 4, "head": 3, "branch_0": 5},
                                                      **FAST)).report
    bits = {layer.name: layer.weight_bits for layer in report.layers}
    assert (bits["stem.0"], bits["head"], bits["branch.0"]) == (4, 3, 5), bits
    assert any("except the weights of head, stem_0" in note for note in report.notes), report.notes
