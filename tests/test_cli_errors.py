"""Issue 6, through the real CLI: every failure class ends with one line on stderr naming the problem and what to
do, its documented exit code, no traceback and no file left behind; Ctrl-C exits 130 leaving nothing partial; the
output honours NO_COLOR, shows no progress bars off a terminal, and --json prints only JSON."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import zeroquant
import zeroquant.export.verify
import zeroquant.pipeline
from zeroquant.cli.app import Interrupted, main

FAST = ["--iterations", "2", "--images", "4", "--batch-size", "4"]
ZEROQUANT = Path(sys.executable).with_name("zeroquant")
COLOUR = re.compile(r"\x1b\[(?:\d+;)*(?:3[0-8]|4[0-8]|9[0-7]|10[0-7])[;m]")  # SGR foreground/background codes


def tiny_cnn(batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
              nn.Linear(4, 3)]
    return nn.Sequential(*(layer for layer in layers if batchnorm or not isinstance(layer, nn.BatchNorm2d))).eval()


def export(model: nn.Module, path: Path) -> Path:
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """One file per kind of model input, built once."""
    folder = tmp_path_factory.mktemp("models")
    files = {"archive": export(tiny_cnn(), folder / "tiny.model"),  # torch.export.load warns unless named .pt2
             "no_bn": export(tiny_cnn(batchnorm=False), folder / "no_bn.pt2")}
    broken = tiny_cnn()
    with torch.no_grad():
        broken[0].weight[0, 0, 0, 0] = float("nan")
    files["nan"] = export(broken, folder / "nan.pt2")
    files["state_dict"] = folder / "tiny_sd.pt"
    torch.save(tiny_cnn().state_dict(), files["state_dict"])
    files["pickled"] = folder / "whole.pt"
    torch.save(tiny_cnn(), files["pickled"])
    files["torchscript"] = folder / "scripted.pt"
    with pytest.warns((FutureWarning, DeprecationWarning)):  # torch.jit is deprecated: why zeroquant refuses it
        torch.jit.save(torch.jit.trace(tiny_cnn(), torch.randn(1, 3, 8, 8)), files["torchscript"])
    files["random"] = folder / "random.pt"
    files["random"].write_bytes(random.Random(0).randbytes(4096))
    files["truncated"] = folder / "truncated.pt2"
    files["truncated"].write_bytes(files["archive"].read_bytes()[:5000])
    files["damaged"] = folder / "damaged.pt2"
    with zipfile.ZipFile(files["archive"]) as source, zipfile.ZipFile(files["damaged"], "w") as target:
        for member in source.infolist():
            if not member.filename.endswith("weights/weight_0"):
                target.writestr(member, source.read(member))
    return files


@pytest.fixture
def out(tmp_path, monkeypatch) -> Path:
    """An empty output folder, and a private calibration cache."""
    monkeypatch.setenv("ZEROQUANT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def quantize(capsys, model, out: Path, *args) -> tuple[int, str, str]:
    code = main(["quantize", str(model), "-o", str(out / "model.onnx"), *FAST, *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


STAGE_LINE = re.compile(r"zeroquant: [\w ()-]+ \.\.\. (\d+\.\d s|failed)")


def assert_failed(result, code: int, phrase: str, out: Path) -> None:
    """The error is one line, the last; before it only the lines of the stages that ran (stderr is not a tty)."""
    exit_code, stdout, stderr = result
    assert exit_code == code, stderr
    *stages, error = stderr.splitlines()
    assert error.startswith("zeroquant: error: ") and stderr.endswith("\n"), stderr
    assert all(STAGE_LINE.fullmatch(line) for line in stages), stderr
    assert phrase in error
    assert "Traceback" not in stderr and stdout == ""
    assert not any(out.iterdir())
    assert not list(out.parent.glob("cache/**/*.tmp"))


@pytest.mark.parametrize(("model", "args", "code", "phrase"), [
    ("missing", [], 3, "model file not found"),
    ("truncated", [], 3, "cannot read model file"),
    ("random", [], 3, "not a torch.export archive, checkpoint or state_dict"),
    ("damaged", [], 3, "cannot load torch.export archive"),
    ("state_dict", [], 2, "pass --arch NAME to say which model they belong to (known: efficientnet_lite0, "),
    ("state_dict", ["--arch", "resnet20_cifar10"], 3, "do not fit resnet20_cifar10: missing keys: conv1.weight"),
    ("torchscript", [], 3, "TorchScript archive, which zeroquant cannot read (re-save it with torch.export"),
    ("pickled", [], 3, "--trust-pickle loads it"),
    ("no_bn", [], 4, "no BatchNorm layers, so there are no statistics to distill calibration images from (use "
                     "--method noise"),
    ("nan", [], 4, "weights are not finite: 0.weight holds NaN or inf"),
    ("archive", ["--input-shape", "5,8,8"], 4, "the model rejects input shape 5,8,8"),
    ("archive", ["--wbits", "1"], 2, "--wbits 1 is out of range (zeroquant supports 2 to 8 bits)"),
    ("archive", ["--abits", "17"], 2, "--abits 17 is out of range"),
], ids=["missing", "truncated", "random", "damaged", "no-arch", "mismatch", "torchscript", "pickle", "no-bn", "nan",
        "input-shape", "wbits", "abits"])
def test_bad_input(capsys, models, out, model, args, code, phrase):
    path = models.get(model, out.parent / "absent.pt2")
    assert_failed(quantize(capsys, path, out, *args), code, phrase, out)


def test_unreadable_file(capsys, models, out, monkeypatch):
    """chmod does not stop root, so the refusal the kernel would give is simulated."""
    opened = Path.open

    def open_(self, *args, **kwargs):
        if self == models["archive"]:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    assert_failed(quantize(capsys, models["archive"], out), 3, "cannot open model file", out)


def test_output_folder_missing(capsys, models, out):
    code = main(["quantize", str(models["archive"]), "-o", str(out / "sub" / "model.onnx"), *FAST])
    assert_failed((code, *capsys.readouterr()), 6, "output folder does not exist", out)


def test_output_folder_read_only(capsys, models, out, monkeypatch):
    """Fails before distilling. chmod does not stop root, so os.open also refuses files in the folder."""
    os_open = os.open

    def refuse(path, *args, **kwargs):
        if out in (Path(path), Path(path).parent):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return os_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(zeroquant.pipeline, "distill_set",
                        lambda *args, **kwargs: pytest.fail("distilled into a read-only folder"))
    out.chmod(0o555)
    try:
        assert_failed(quantize(capsys, models["archive"], out), 6, "cannot write to", out)
    finally:
        out.chmod(0o755)


def fail_writes_of(monkeypatch, marker: str, error) -> None:
    """Make os.fsync inside write_atomic raise `error` for the temp file whose name contains `marker`."""
    fsync = os.fsync

    def fake(fd):
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            error()
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", fake)


def test_disk_full_while_writing_report(capsys, models, out, monkeypatch):
    """The .onnx and float .onnx are written before the report fails: both must go."""
    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    fail_writes_of(monkeypatch, ".model.onnx.json.", disk_full)
    result = quantize(capsys, models["archive"], out, "--float-output", out / "float.onnx")
    assert_failed(result, 6, "No space left on device", out)


def test_failed_write_keeps_the_previous_outputs(capsys, models, out, monkeypatch):
    """A second run whose report cannot be written leaves the first run's files byte for byte."""
    assert quantize(capsys, models["archive"], out, "--float-output", out / "float.onnx")[0] == 0
    before = {path: path.read_bytes() for path in out.iterdir()}

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    fail_writes_of(monkeypatch, ".model.onnx.json.", disk_full)
    code, _, stderr = quantize(capsys, models["archive"], out, "--float-output", out / "float.onnx", "--seed", "1")
    assert code == 6 and "No space left on device" in stderr
    assert {path: path.read_bytes() for path in out.iterdir()} == before


@pytest.mark.parametrize("error", [KeyboardInterrupt, Interrupted("interrupted; no output was written")])
def test_interrupt_during_a_stage(capsys, models, out, monkeypatch, error):
    def interrupted(*args, **kwargs):
        raise error

    monkeypatch.setattr(zeroquant.pipeline, "calibrate", interrupted)
    assert_failed(quantize(capsys, models["archive"], out), 130, "interrupted; no output was written", out)


def test_ctrl_c_while_writing(capsys, models, out, monkeypatch):
    """A real SIGINT while the report is written: nothing is moved into place."""
    # Python's own handler, even where the parent made SIGINT ignored (a job started in the background with `&`)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        fail_writes_of(monkeypatch, ".model.onnx.json.", lambda: os.kill(os.getpid(), signal.SIGINT))
        assert_failed(quantize(capsys, models["archive"], out), 130, "interrupted", out)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_debug_shows_the_traceback(capsys, out):
    assert main(["--debug", "quantize", str(out / "absent.pt2")]) == 3
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr and stderr.endswith("zeroquant: error: model file not found: "
                                                     f"{out / 'absent.pt2'} (check the path)\n")


def test_success_json_and_quiet_stderr(capfd, models, out):
    """capfd, not capsys: anything a library prints on the real stdout would break the JSON too."""
    assert main(["quantize", str(models["archive"]), "-o", str(out / "model.onnx"), *FAST, "--json",
                 "--float-output", str(out / "float.onnx")]) == 0
    stdout, stderr = capfd.readouterr()
    report = json.loads(stdout)
    assert report["output"] == str(out / "model.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["float.onnx", "model.onnx", "model.onnx.json"]
    assert stderr == ""  # no progress bar: stderr is not a terminal


def test_real_process_has_no_traceback(models, tmp_path):
    env = os.environ | {"ZEROQUANT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([ZEROQUANT, "quantize", models["random"], "-o", tmp_path / "m.onnx"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.startswith("zeroquant: error: cannot read model file") and done.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("no_color", [False, True])
def test_no_color(no_color):
    """FORCE_COLOR makes rich colour a pipe, as on a terminal; NO_COLOR must still win."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"FORCE_COLOR": "1"}
    if no_color:
        env["NO_COLOR"] = "1"
    done = subprocess.run([ZEROQUANT, "quantize", "--wbits"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "requires an argument" in done.stderr
    assert bool(COLOUR.search(done.stderr)) is not no_color


def broken_capture(*args, **kwargs):
    raise RuntimeError("boom")


def test_internal_error_is_one_line_saying_it_is_a_bug(capsys, models, out, monkeypatch):
    monkeypatch.setattr(zeroquant.pipeline, "capture", broken_capture)
    assert_failed(quantize(capsys, models["archive"], out), 70, "a bug in zeroquant: RuntimeError: boom (rerun with "
                                                                "--debug", out)


def test_debug_shows_where_an_internal_error_happened(capsys, models, out, monkeypatch):
    monkeypatch.setattr(zeroquant.pipeline, "capture", broken_capture)
    assert main(["--debug", "quantize", str(models["archive"]), "-o", str(out / "m.onnx"), *FAST]) == 70
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr and 'in broken_capture\n    raise RuntimeError("boom")' in stderr


def test_the_python_api_raises_the_original_exception(models, out, monkeypatch):
    monkeypatch.setattr(zeroquant.pipeline, "capture", broken_capture)
    with pytest.raises(RuntimeError, match="boom"):
        zeroquant.quantize(models["archive"], out / "m.onnx", iterations=2, images=4, batch_size=4)


def test_an_exception_without_a_message(capsys, models, out, monkeypatch):
    def silent(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(zeroquant.pipeline, "capture", silent)
    assert_failed(quantize(capsys, models["archive"], out), 70, "a bug in zeroquant: RuntimeError: RuntimeError", out)


def test_onnxruntime_error_without_a_message_is_still_one_line(tmp_path, monkeypatch):
    """runtime.session took splitlines()[0] of onnxruntime's message: an IndexError when it was empty."""
    import onnxruntime

    from zeroquant.errors import ModelLoadError
    from zeroquant.runtime import session

    def refuse(*args, **kwargs):
        raise RuntimeError("")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load the model: RuntimeError"):
        session(b"not onnx")


def test_a_bug_in_the_parity_check_is_not_a_failed_verification(capsys, models, out, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(zeroquant.export.verify, "run_all", broken)
    assert_failed(quantize(capsys, models["archive"], out), 70, "ValueError: operands could not be broadcast", out)
