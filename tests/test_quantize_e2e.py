"""End to end: distil, quantize, export, and run the ONNX file in a real onnxruntime session."""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import SHARED, make_small_net
from zeroquant.cli.app import main
from zeroquant.runtime import predict, session
from zeroquant.evaluate.datasets import dataset_for_zoo
from zeroquant.options import QuantizeOptions
from zeroquant.pipeline import quantize
from zeroquant.zoo.loading import LoadedModel

FAST = dict(images=8, batch_size=8, iterations=50)  # inversion images after 5 steps are still their start noise


def loaded_small_net() -> LoadedModel:
    return LoadedModel(make_small_net(), "small", (3, 16, 16), None, None)


def fresh_inputs(n: int = 256) -> np.ndarray:
    """Inputs neither distillation, calibration nor verification saw."""
    return np.random.default_rng(1).standard_normal((n, 3, 16, 16), dtype=np.float32)


def assert_w8a8_fidelity(quantized: np.ndarray, reference: np.ndarray) -> None:
    """W8A8 against the float model, tight enough that a broken W8A8 fails: measured 3.0-3.6 % max and 1.0-1.2 % mean
    relative error, 100 % argmax agreement; activation ranges clipped to 0.7x (a calibration bug the parity gate
    cannot see: the simulation has it too) give 11.5 % / 3.8 %, and to 0.5x 24 % / 10 %."""
    assert np.abs(quantized - reference).max() < 0.08 * np.abs(reference).max()
    assert np.abs(quantized - reference).mean() < 0.025 * np.abs(reference).mean()
    assert (quantized.argmax(1) == reference.argmax(1)).mean() >= 0.97


def test_small_net_quantizes_to_integer_kernels(tmp_path):
    out = tmp_path / "small.onnx"
    report = quantize(loaded_small_net(), out, options=QuantizeOptions(**FAST, target_cpu="portable"),
                      float_output=tmp_path / "fp32.onnx").report
    model = onnx.load(out)
    onnx.checker.check_model(model)
    weights = {i.name: i for i in model.graph.initializer if i.name.endswith(".weight")}
    assert len(weights) == 5 and all(w.data_type == onnx.TensorProto.INT8 for w in weights.values())
    assert report.census["integer_mac_fraction"] == 1.0, report.census
    # the zero Pad was folded into its conv and the global pool runs as an integer kernel: no float islands; the
    # one Pad left widens the uint8 image to 4 channels (export/channel_padding.py)
    assert {op for op in report.census["op_counts"]} <= {"QuantizeLinear", "QLinearConv", "QLinearAdd", "MaxPool",
                                                         "QLinearGlobalAveragePool", "Reshape", "Flatten", "QGemm",
                                                         "DequantizeLinear", "Pad"}, report.census["op_counts"]
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    assert [producer.get(n.input[0]) for n in model.graph.node if n.op_type == "Pad"] == ["QuantizeLinear"]
    assert not any(n.op_type == "ReduceMean" for n in model.graph.node)
    assert report.parity["top1_agreement"] >= 95
    integer = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = integer.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("input", "tensor(float)", [3, 16, 16])
    x = fresh_inputs()
    quantized = integer.run(None, {"input": x})[0]
    reference = session(tmp_path / "fp32.onnx").run(None, {"input": x})[0]
    assert quantized.shape == (256, 5)
    assert_w8a8_fidelity(quantized, reference)
    written = json.loads((tmp_path / "small.onnx.json").read_text())
    assert written["census"]["integer_layers"] == report.census["integer_layers"]
    assert len(written["layers"]) == 5 and {layer["weight_qmax"] for layer in written["layers"]} == {63, 127}
    assert any("--target-cpu portable" in note for note in written["notes"])


def test_a_dead_channel_keeps_its_bias(tmp_path):
    """A BN channel with gamma ~0 folds into weights ~0 and a bias of 2; its int32 bias must still hold 2 (on the
    grid input scale x weight scale it needs ~1e12 and was clamped to int32, giving ~0). After the stem's ReLU the
    channel is a constant 2 that every later layer reads."""
    model = make_small_net()
    with torch.no_grad():
        bn = model.stem[1]
        bn.weight[0], bn.bias[0] = 1e-12, 2.0
    out = tmp_path / "dead.onnx"
    quantize(LoadedModel(model, "dead", (3, 16, 16), None, None), out,
             options=QuantizeOptions(**FAST, target_cpu="portable"), float_output=tmp_path / "fp32.onnx")
    x = fresh_inputs()
    quantized = session(out).run(None, {"input": x})[0]
    reference = session(tmp_path / "fp32.onnx").run(None, {"input": x})[0]
    # measured 8.4 % max / 1.2 % mean relative error (the constant channel widens the ranges after it); with the
    # bias clamped to int32: 56 % / 31 %
    assert np.abs(quantized - reference).max() < 0.15 * np.abs(reference).max()
    assert np.abs(quantized - reference).mean() < 0.025 * np.abs(reference).mean()
    biases = [onnx.numpy_helper.to_array(t).astype(np.int64) for t in onnx.load(out).graph.initializer
              if t.data_type == onnx.TensorProto.INT32]
    assert biases and max(np.abs(b).max() for b in biases) <= 1.001 * 2**30  # half of int32 (up to float32 rounding)


@pytest.mark.parametrize("has_int32_dot, qmax", [(True, {127}), (False, {63, 127})])
def test_target_cpu_auto_follows_this_cpu(tmp_path, monkeypatch, has_int32_dot, qmax):
    """auto gives full int8 weights where this CPU's dot products add in int32, the 7-bit grid where they may not."""
    monkeypatch.setattr("zeroquant.options.int32_dot_products", lambda: has_int32_dot)
    report = quantize(loaded_small_net(), tmp_path / "m.onnx", options=QuantizeOptions(**FAST)).report
    assert {layer.weight_qmax for layer in report.layers} == qmax
    assert report.settings["target_cpu"] == "auto"
    assert any(note.startswith("--target-cpu auto (this CPU:") for note in report.notes)


@pytest.mark.parametrize("options", [dict(ranges="auto", bias_correction="analytic"),
                                     dict(ranges="analytic", equalize=True, bias_correction="on")])
def test_range_and_conditioning_options_export_verified_models(tmp_path, options):
    """Checked against the float model on fresh inputs, not against the parity gate the pipeline already passed."""
    report = quantize(loaded_small_net(), tmp_path / "small.onnx", options=QuantizeOptions(**FAST, **options),
                      float_output=tmp_path / "fp32.onnx").report
    assert report.census["integer_mac_fraction"] == 1.0
    assert report.settings["ranges"] == options["ranges"]
    x = fresh_inputs()
    quantized, reference = predict(session(tmp_path / "small.onnx"), x), predict(session(tmp_path / "fp32.onnx"), x)
    assert_w8a8_fidelity(quantized, reference)


def test_same_seed_gives_same_bytes(tmp_path):
    digests = []
    for run in range(2):
        out = tmp_path / f"run{run}.onnx"
        quantize(loaded_small_net(), out, options=QuantizeOptions(**FAST, cache=False))
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
        report = json.loads((tmp_path / f"run{run}.onnx.json").read_text())
        report.pop("timings"), report.pop("output")
        digests.append(hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest())
    assert digests[0] == digests[2] and digests[1] == digests[3]


def test_cache_skips_distillation(tmp_path):
    first = quantize(loaded_small_net(), tmp_path / "a.onnx", options=QuantizeOptions(**FAST, seed=3)).report
    second = quantize(loaded_small_net(), tmp_path / "b.onnx", options=QuantizeOptions(**FAST, seed=3)).report
    assert not first.timings["distill_from_cache"] and second.timings["distill_from_cache"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="needs ../shared")
def test_resnet20_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "r20.onnx"
    code = main(["quantize", "zoo:resnet20_cifar10", "-o", str(out), "--float-output", str(tmp_path / "fp32.onnx"),
                 "--iterations", "30", "--images", "16", "--batch-size", "16", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["census"]["integer_mac_fraction"] == 1.0
    data = dataset_for_zoo("resnet20_cifar10", limit=500)
    quantized = predict(session(out), data.images).argmax(1)
    reference = predict(session(tmp_path / "fp32.onnx"), data.images).argmax(1)
    fp32_top1, int8_top1 = (reference == data.labels).mean(), (quantized == data.labels).mean()
    assert fp32_top1 > 0.75  # the real ResNet-20 on real CIFAR-10 photographs
    assert int8_top1 >= fp32_top1 - 0.02, (int8_top1, fp32_top1)
    assert (quantized == reference).mean() >= 0.95
    assert out.stat().st_size < 0.35 * (tmp_path / "fp32.onnx").stat().st_size
