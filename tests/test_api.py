"""The Python API (issue 15): the README example as written, the model kinds it takes, typed errors, progress
callbacks, and the pipeline paths the CLI tests do not reach (noise and Genie calibration, a damaged cache entry,
verification failure, BN folding)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import zeroquant
import zeroquant.export.integer_model
from tests.conftest import SHARED, make_small_net
from zeroquant.calib import cache
from zeroquant.export.verify import Parity
from zeroquant.cli.app import main
from zeroquant.graph.batchnorm import fold_batchnorm
from zeroquant.graph.capture import capture
from zeroquant.runtime import predict, session

README = Path(__file__).resolve().parents[1] / "README.md"
SHAPE = (3, 16, 16)
FAST = dict(images=8, batch_size=8, iterations=5)


def readme_python() -> str:
    """The code blocks of the README's 'Python API' section, joined."""
    section = README.read_text().split("### Python API", 1)[1].split("\n### ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, re.DOTALL))


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    code = readme_python()
    assert "zeroquant.quantize(" in code and "zeroquant.pareto(" in code and "zeroquant.distill(" in code
    monkeypatch.chdir(tmp_path)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "Inversion distillation: " in done.stdout and "verify: " in done.stdout
    fraction, size = lines[next(i for i, line in enumerate(lines) if line.startswith("write: ")) + 1].split()
    assert float(fraction) == 1.0 and int(size) == (tmp_path / "model.onnx").stat().st_size
    assert lines[-1] == "torch.Size([32, 3, 32, 32])"
    assert (tmp_path / "model.onnx.json").is_file() and (tmp_path / "pareto.png").stat().st_size > 10_000


def small_archive(folder: Path) -> Path:
    """The small net saved as a torch.export archive with a dynamic batch, as users save theirs."""
    path = folder / "small.pt2"
    torch.export.save(torch.export.export(make_small_net(), (torch.randn(2, *SHAPE),),
                                          dynamic_shapes=({0: torch.export.Dim("b")},)), path)
    return path


def test_module_program_and_file_give_the_same_model(tmp_path):
    model = make_small_net()
    program = torch.export.export(model, (torch.randn(2, *SHAPE),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "small.pt2")
    from_module = zeroquant.quantize(model, input_shape=SHAPE, **FAST)
    from_program = zeroquant.quantize(program, **FAST)  # the program knows its input shape
    from_file = zeroquant.quantize(tmp_path / "small.pt2", **FAST)
    assert from_module.onnx == from_program.onnx == from_file.onnx
    assert not list(tmp_path.glob("*.onnx"))  # no output asked for: nothing written
    logits = predict(session(from_module.onnx), np.random.default_rng(0).standard_normal((4, *SHAPE), np.float32))
    assert logits.shape == (4, 5) and np.isfinite(logits).all()


def test_options_are_validated_like_the_cli(tmp_path):
    with pytest.raises(zeroquant.UsageError, match="--wbits 9 is out of range"):
        zeroquant.quantize(make_small_net(), input_shape=SHAPE, wbits=9)
    with pytest.raises(zeroquant.UsageError, match="unknown option.*wbit\\b"):
        zeroquant.quantize(make_small_net(), input_shape=SHAPE, wbit=4)
    with pytest.raises(zeroquant.UsageError, match="cannot read --budget"):
        zeroquant.quantize(make_small_net(), input_shape=SHAPE, budget="lots")
    with pytest.raises(zeroquant.UsageError, match="input shape is unknown"):
        zeroquant.quantize(make_small_net())
    with pytest.raises(zeroquant.OutputError, match="output folder does not exist"):
        zeroquant.quantize(make_small_net(), tmp_path / "missing" / "m.onnx", input_shape=SHAPE)
    with pytest.raises(zeroquant.UsageError, match="cannot quantize a dict"):
        zeroquant.quantize({"not": "a model"}, input_shape=SHAPE)


def test_progress_callback_and_silence(tmp_path, capfd):
    events = []
    zeroquant.quantize(make_small_net(), tmp_path / "m.onnx", input_shape=SHAPE, progress=events.append,
                       cache=False, **FAST)
    finished = [e.stage for e in events if e.finished]
    assert finished == ["capture", "Inversion distillation", "calibrate", "bias correction", "export", "verify", "write"]
    steps = [e.done for e in events if e.stage == "Inversion distillation"]
    assert steps == [0, 1, 2, 3, 4, 5, 5]
    assert capfd.readouterr() == ("", "")  # the library itself never prints


def test_stage_lines_when_stderr_is_not_a_terminal(tmp_path):
    model = small_archive(tmp_path)
    done = subprocess.run([Path(sys.executable).with_name("zeroquant"), "quantize", str(model), "-o",
                           str(tmp_path / "m.onnx"), "--images", "8", "--batch-size", "8", "--iterations", "5"],
                          capture_output=True, text=True, timeout=300,
                          env={"ZEROQUANT_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line.split(" ...")[0] for line in lines] == [
        "zeroquant: capture", "zeroquant: Inversion distillation (5 steps)", "zeroquant: calibrate",
        "zeroquant: bias correction", "zeroquant: export", "zeroquant: verify", "zeroquant: write"]
    assert all(re.fullmatch(r".* \.\.\. \d+\.\d s", line) for line in lines), lines
    assert "integer MACs" in done.stdout


def test_pareto_result(tmp_path):
    frontier = zeroquant.pareto(make_small_net(), input_shape=SHAPE, wbits_choices=(2, 4, 8), **FAST)
    points = frontier.points
    assert [p["size_bytes"] for p in points] == sorted(p["size_bytes"] for p in points)
    chosen = frontier.choose("5")
    assert chosen["average_bits"] <= 5 and chosen in points
    assert all(p["average_bits"] > 5 for p in points[points.index(chosen) + 1:])
    assert frontier.plot(tmp_path / "p.png")[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "p.png").is_file()
    frontier.save(tmp_path / "out")  # the folder is made
    assert json.loads((tmp_path / "out" / "pareto.json").read_text()) == frontier.data


@pytest.mark.parametrize("method", ["noise", "genie"])
def test_other_calibration_methods_through_the_pipeline(tmp_path, method):
    """The method reaches the images and, through them, the file: not only the report's label."""
    result = zeroquant.quantize(make_small_net(), tmp_path / "m.onnx", input_shape=SHAPE, method=method, **FAST)
    assert result.report.distillation["method"] == method
    assert result.report.census["integer_mac_fraction"] == 1.0
    images = zeroquant.distill(make_small_net(), input_shape=SHAPE, method=method, **FAST)
    assert images.shape == (8, *SHAPE) and torch.isfinite(images).all()
    default = zeroquant.distill(make_small_net(), input_shape=SHAPE, **FAST)  # zeroq, the same seed
    assert (images - default).abs().mean() > 0.1 * default.abs().mean()
    assert result.onnx != zeroquant.quantize(make_small_net(), input_shape=SHAPE, **FAST).onnx
    if method == "noise":  # plain N(0, 1) draws, not optimised towards the BN statistics
        assert abs(float(images.mean())) < 0.2 and 0.8 < float(images.std()) < 1.2


def test_noise_calibration_quantizes_a_network_without_batchnorm(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(zeroquant.UnsupportedModelError, match="no BatchNorm"):
        zeroquant.quantize(model, input_shape=SHAPE, **FAST)
    result = zeroquant.quantize(model, input_shape=SHAPE, method="noise", **FAST)
    assert result.report.census["integer_mac_fraction"] == 1.0


def test_given_calibration_images_are_used_as_they_are(tmp_path, monkeypatch):
    images = zeroquant.distill(make_small_net(), tmp_path / "calib.pt", input_shape=SHAPE, **FAST)
    monkeypatch.setattr(zeroquant.pipeline, "distill_set", lambda *a, **k: pytest.fail("distilled again"))
    from_tensor = zeroquant.quantize(make_small_net(), input_shape=SHAPE, calibration=images, **FAST)
    from_file = zeroquant.quantize(make_small_net(), input_shape=SHAPE, calibration=tmp_path / "calib.pt", **FAST)
    assert from_tensor.onnx == from_file.onnx
    with pytest.raises(zeroquant.UsageError, match="calibration images are"):
        zeroquant.quantize(make_small_net(), input_shape=(3, 20, 20), calibration=images, **FAST)
    (tmp_path / "bad.pt").write_bytes(b"not a tensor file")
    with pytest.raises(zeroquant.ModelLoadError, match="cannot read calibration set"):
        zeroquant.quantize(make_small_net(), input_shape=SHAPE, calibration=tmp_path / "bad.pt", **FAST)


def test_a_damaged_cache_entry_is_distilled_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROQUANT_CACHE", str(tmp_path / "cache"))
    first = zeroquant.quantize(make_small_net(), input_shape=SHAPE, **FAST)
    (entry,) = cache.cache_dir().glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a crash of another process or a full disk
    again = zeroquant.quantize(make_small_net(), input_shape=SHAPE, **FAST)
    assert not again.report.timings["distill_from_cache"] and again.onnx == first.onnx
    assert cache.load(entry.stem) is not None  # the entry was written again, whole
    assert zeroquant.quantize(make_small_net(), input_shape=SHAPE, **FAST).report.timings["distill_from_cache"]


def test_images_cached_by_other_distiller_code_are_not_reused(tmp_path, monkeypatch):
    """Two builds of one zeroquant version (a source checkout, a patched install) differ in the calib package's code:
    the second must distil its own images, not take the first one's from the cache."""
    monkeypatch.setenv("ZEROQUANT_CACHE", str(tmp_path / "cache"))
    zeroquant.quantize(make_small_net(), input_shape=SHAPE, **FAST)
    assert zeroquant.quantize(make_small_net(), input_shape=SHAPE, **FAST).report.timings["distill_from_cache"]
    source = cache.distiller_source()
    assert source == cache.distiller_source.__wrapped__()  # a hash of the files, the same each time it is read
    monkeypatch.setattr(cache, "distiller_source", lambda: source[::-1])  # what an edited inversion.py gives
    assert not zeroquant.quantize(make_small_net(), input_shape=SHAPE, **FAST).report.timings["distill_from_cache"]


@pytest.fixture
def corrupted_export(monkeypatch):
    """An export that no longer computes what the simulation does: every layer's weights negated."""
    integer_layer = zeroquant.export.integer_model.IntegerLayer

    class Corrupted(integer_layer):
        def __init__(self, layer):
            super().__init__(layer)
            self.weight = -self.weight

    monkeypatch.setattr(zeroquant.export.integer_model, "IntegerLayer", Corrupted)


def test_verification_failure_exits_5_and_writes_nothing(tmp_path, corrupted_export, capsys):
    """An export that no longer computes what the simulation does must be refused, not written."""
    model = small_archive(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["quantize", str(model), "-o", str(out / "m.onnx"), "--float-output", str(out / "f.onnx"),
                 "--images", "8", "--batch-size", "8", "--iterations", "5"])
    error = capsys.readouterr().err.splitlines()[-1]
    assert code == 5 and error.startswith("zeroquant: error: onnxruntime's integer model diverges") and \
        "nothing was written" in error
    assert "the file does not compute what the simulation does, an export bug" in error  # not blamed on rounding
    assert not any(out.iterdir())


def test_a_raised_parity_tolerance_writes_the_file_with_the_diagnosis_as_a_warning(tmp_path, corrupted_export):
    result = zeroquant.quantize(make_small_net(), tmp_path / "m.onnx", input_shape=SHAPE, images=8, batch_size=8,
                                iterations=5, cache=False, parity_tolerance=2.0)
    warning = [n for n in result.report.notes if "accepted at --parity-tolerance 2" in n]
    assert (tmp_path / "m.onnx").exists() and result.report.parity["relative_max_diff"] > 0.5
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "an export bug" in warning[0]


@pytest.mark.parametrize("reference, quantization, cause", [
    (0.20, 3.6, "rounding alone can explain it"),  # timm fbnetv3_b (random weights) at 224 px: 0.21, 0.19, 14
    (0.02, 0.05, "its integer kernels do not"),
    (0.20, 0.05, "an export bug")])
def test_a_diverged_file_is_told_apart_by_the_float_run_and_the_quantization_error(reference, quantization, cause):
    """Above the tolerance, the float run of the same file and the simulation's own distance to the float model say
    which: a model that amplifies rounding, onnxruntime's kernels, or the file itself."""
    check = Parity(16, 75.0, 0.05, 0.007, 0.2, {}, 0.1, reference, quantization)
    assert check.diverged and cause in check.diagnosis()
    assert not Parity(16, 75.0, 0.05, 0.007, 0.2, {}, 0.3).diverged  # --parity-tolerance 0.3 accepts it


def test_batchnorm_folding_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 12 * 12, 6), nn.BatchNorm1d(6))
    for bn in (model[1], model[4], model[7]):  # statistics and affine parameters far from the identity
        bn.running_mean.uniform_(-2, 2), bn.running_var.uniform_(0.1, 4), bn.weight.data.uniform_(-2, 2)
        bn.bias.data.uniform_(-1, 1)
    model.eval()
    graph = capture(model, SHAPE).graph_module
    folded, unfolded = fold_batchnorm(graph)
    assert unfolded == 0 and not [n for n in folded.graph.nodes if "batch_norm" in str(n.target)]
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_zoo_and_eval_commands(tmp_path, capsys):
    assert main(["zoo", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["efficientnet_lite0"]["input_shape"] == [3, 224, 224]
    assert entries["resnet18"]["weights"] == "--weights FILE"
    assert main(["zoo"]) == 0 and "resnet20_cifar10" in capsys.readouterr().out
    if not (SHARED / "data/cifar10/test").is_dir():
        pytest.skip("needs ../shared")
    out = tmp_path / "r20.onnx"
    assert main(["quantize", "zoo:resnet20_cifar10", "-o", str(out), "--float-output", str(tmp_path / "fp32.onnx"),
                 "--images", "8", "--batch-size", "8", "--iterations", "5", "--json"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--zoo", "resnet20_cifar10", "--limit", "200", "--reference",
                 str(tmp_path / "fp32.onnx"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 200 and result["top1"] > 60 and result["agreement"] > 85
    assert main(["eval", str(out), "--zoo", "resnet20_cifar10", "--preprocess", "cifar10"]) == 2
    assert "exactly one of --zoo NAME or --preprocess NAME" in capsys.readouterr().err
    onnx.checker.check_model(onnx.load(out))


def test_the_distillation_precision_reaches_the_images_and_the_report(tmp_path, capsys):
    """bfloat16 is opt-in (its images calibrated Lite0 W4A8 worse): asked for, it shapes the images, the cache key
    and the report; float32 is the default."""
    assert zeroquant.QuantizeOptions().distill_precision == "float32"
    images = {p: zeroquant.distill(make_small_net(), input_shape=SHAPE, distill_precision=p, **FAST)
              for p in ("float32", "bfloat16")}
    assert not torch.equal(images["float32"], images["bfloat16"])
    assert (images["float32"] - images["bfloat16"]).abs().mean() < 0.1 * images["float32"].abs().mean()
    model = small_archive(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["quantize", str(model), "-o", str(out), "--distill-precision", "bfloat16", "--images", "8",
                 "--batch-size", "8", "--iterations", "5", "--no-cache"]) == 0
    assert "distilled in bfloat16" in capsys.readouterr().out
    report = json.loads((tmp_path / "m.onnx.json").read_text())
    assert report["distillation"]["settings"]["precision"] == "bfloat16"
    assert main(["quantize", str(model), "--distill-precision", "fp8"]) == 2
    assert "unknown --distill-precision 'fp8'" in capsys.readouterr().err
