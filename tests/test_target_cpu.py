"""The CPU a file is made for travels with it (issue 21): its weight grid is in the ONNX metadata, and bench, eval
and the quantize report warn in one line when a file for int32 dot products runs on a CPU without them."""

import onnx
import pytest

import zeroquant
import zeroquant.cpu
from tests.conftest import make_small_net
from zeroquant.cli.app import main

SHAPE = (3, 16, 16)
FAST = dict(images=4, batch_size=4, iterations=3)
AVX2_ONLY = {"cpu": "an AVX2 CPU", "avx2": True, "avx512": False, "vnni": False, "amx": False, "arm_dotprod": False}
VNNI = AVX2_ONLY | {"avx512": True, "vnni": True}
WARNING = "zeroquant: warning: this file was quantized for CPUs with int32 dot products"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grids")
    for grid in ("int32-dot", "portable"):
        zeroquant.quantize(make_small_net(), folder / f"{grid}.onnx", input_shape=SHAPE, target_cpu=grid, **FAST)
    return folder


def props(path) -> dict:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def test_the_weight_grid_is_in_the_metadata(files):
    assert props(files / "int32-dot.onnx") == {"zeroquant.weight_grid": "int32-dot", "zeroquant.target_cpu":
                                               "int32-dot"}
    assert props(files / "portable.onnx")["zeroquant.weight_grid"] == "portable"


@pytest.mark.parametrize(("grid", "cpu", "warned"), [("int32-dot", AVX2_ONLY, True), ("int32-dot", VNNI, False),
                                                     ("portable", AVX2_ONLY, False)])
def test_bench_warns_once_when_the_cpu_lacks_int32_dot_products(files, capsys, monkeypatch, grid, cpu, warned):
    monkeypatch.setattr(zeroquant.cpu, "cpu_info", lambda: cpu)
    assert main(["bench", str(files / f"{grid}.onnx"), "--runs", "2", "--json"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if line.startswith("zeroquant: warning:")] == ([lines[0]] if warned else [])
    if warned:
        assert lines[0].startswith(WARNING) and "VNNI no" in lines[0] and "--target-cpu portable" in lines[0]


def test_eval_warns_before_it_reads_the_images(files, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(zeroquant.cpu, "cpu_info", lambda: AVX2_ONLY)
    code = main(["eval", str(files / "int32-dot.onnx"), "--preprocess", "cifar10", "--data", str(tmp_path / "none")])
    first, *rest = capsys.readouterr().err.splitlines()
    assert code != 0 and first.startswith(WARNING) and not any("warning" in line for line in rest)


def test_the_report_warns_when_quantized_for_int32_dot_here_without_them(monkeypatch):
    monkeypatch.setattr(zeroquant.cpu, "cpu_info", lambda: AVX2_ONLY)
    notes = zeroquant.quantize(make_small_net(), input_shape=SHAPE, target_cpu="int32-dot", **FAST).report.notes
    assert [note for note in notes if note.startswith("warning: this file was quantized for CPUs with int32")]
    auto = zeroquant.quantize(make_small_net(), input_shape=SHAPE, **FAST).report.notes  # auto: portable here
    assert not [note for note in auto if note.startswith("warning:")]
