"""`zeroquant bench`, the latency/census helpers and the onnxruntime baselines, on tiny real ONNX models."""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from zeroquant.cli.app import main
from zeroquant.census import kernel_census
from zeroquant.evaluate.latency import measure, time_by_kind

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from ort_baselines import ort_dynamic, ort_static  # noqa: E402
from results_file import write_section  # noqa: E402

SHAPE = (3, 16, 16)


class _Noise(CalibrationDataReader):
    def __init__(self):
        self.batches = iter([{"x": np.random.default_rng(i).standard_normal((2, *SHAPE), dtype=np.float32)}
                             for i in range(3)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A float conv net (Conv 3->8 valid, ReLU, pool, Linear 8->5) and its onnxruntime QDQ quantization."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    folder = tmp_path_factory.mktemp("bench")
    fp32, qdq = folder / "fp32.onnx", folder / "qdq.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but much faster than dynamo here
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, *SHAPE),), fp32, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    quantize_static(fp32, qdq, _Noise(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return fp32, qdq


def _bench_json(capsys, *args) -> dict:
    assert main(["bench", *map(str, args), "--runs", "5", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_latency_and_float_census(models, capsys):
    fp32, _ = models
    result = _bench_json(capsys, fp32)
    (row,) = result["models"]
    assert result["runs"] == row["runs"] == 5 and result["batch"] == 1
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"] and row["images_per_s"] > 0
    assert row["bytes"] == fp32.stat().st_size
    census = row["census"]
    assert census["integer_kernels"] == {} and sum(census["float_kernels"].values()) == 2
    assert census["integer_mac_fraction"] == 0 and len(census["float_layers"]) == 2
    assert census["total_macs"] == 8 * 3 * 3 * 3 * 14 * 14 + 8 * 5  # conv on 14x14 outputs + linear


def test_bench_vs_gives_interleaved_ratios(models, capsys):
    fp32, qdq = models
    result = _bench_json(capsys, qdq, "--vs", fp32, "--vs", qdq, "--threads", "1", "--batch", "2")
    quantized, float_row, same = result["models"]
    assert quantized["census"]["integer_kernels"]["QLinearConv"] == 1
    assert quantized["census"]["integer_mac_fraction"] == 1.0
    assert "QLinearConv" not in float_row["census"]["integer_kernels"]
    assert "ratio" not in quantized
    for row in (float_row, same):
        assert row["ratio"]["latency"] == pytest.approx(quantized["median_ms"] / row["median_ms"])
        assert row["ratio"]["latency"] > 0 and row["runs"] == 5
    assert same["ratio"]["size"] == 1.0 and float_row["ratio"]["size"] == qdq.stat().st_size / fp32.stat().st_size


def test_bench_table_and_errors(models, capsys):
    fp32, qdq = models
    assert main(["bench", str(qdq), "--vs", str(fp32), "--runs", "3"]) == 0
    out = capsys.readouterr().out
    assert "(MODEL)" in out and "QLinearConv 1" in out and "FusedConv 1" in out and "interleaved" in out
    assert main(["bench", str(fp32.parent / "missing.onnx"), "--runs", "3"]) == 3
    assert main(["bench", str(fp32), "--runs", "0"]) == 2


def test_profile_groups_kernel_time_by_layer_kind(models, tmp_path, capsys):
    """A pointwise -> depthwise -> linear net: each layer lands in its own kind, float and integer alike."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 5, groups=8),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    fp32 = tmp_path / "dw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, *SHAPE),), fp32, dynamo=False, input_names=["x"])
    by_kind = {k.kind: k for k in time_by_kind(fp32, runs=5)}
    assert {kind: k.layers for kind, k in by_kind.items() if kind in ("pointwise 1x1", "depthwise 5x5",
                                                                      "fully connected")} == {
        "pointwise 1x1": 1, "depthwise 5x5": 1, "fully connected": 1}
    assert all(k.ms > 0 for k in by_kind.values())

    _, qdq = models
    quantized, float_row = _bench_json(capsys, qdq, "--vs", models[0], "--profile")["models"]
    assert {k["kind"] for k in quantized["time_by_kind"]} >= {"dense conv 3x3", "fully connected"}
    assert "QuantizeLinear" in {k["kind"] for k in quantized["time_by_kind"]}  # other ops keep their op type
    assert "QuantizeLinear" not in {k["kind"] for k in float_row["time_by_kind"]}
    assert main(["bench", str(qdq), "--vs", str(models[0]), "--runs", "3", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "where the time goes" in out and "dense conv 3x3 (1)" in out and "all kernels" in out


def test_measure_picks_enough_runs(models):
    fp32, qdq = models
    latencies = measure([fp32, qdq], warmup=2, seconds=0)
    assert [lat.runs for lat in latencies] == [30, 30]  # the floor: a tiny model is timed at least 30 times


def test_ort_baselines_build_runnable_integer_models(models, tmp_path):
    fp32, _ = models
    x = np.random.default_rng(1).standard_normal((4, *SHAPE), dtype=np.float32)
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    builders = {"static": lambda out: ort_static(fp32, out, x), "dynamic": lambda out: ort_dynamic(fp32, out)}
    for name, build in builders.items():
        out = tmp_path / f"{name}.onnx"
        assert build(out) > 0
        logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert logits.shape == (4, 5) and np.abs(logits - reference).max() < 0.1 * np.abs(reference).max() + 0.05
        assert kernel_census(out)["integer_mac_fraction"] == 1.0, name


def test_results_sections_replace_only_their_own(tmp_path):
    results = tmp_path / "RESULTS.md"
    write_section(results, "w8a8", "## W8A8\n\nfirst")
    write_section(results, "lowbit", "## Low bit\n\nlow")
    write_section(results, "w8a8", "## W8A8\n\nsecond")
    text = results.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "second" in text and "first" not in text and "low" in text
    assert text.index("## W8A8") < text.index("## Low bit")  # a rerun keeps the section's place
    assert text.count("<!-- begin w8a8 -->") == 1
