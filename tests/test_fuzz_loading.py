"""Damaged model files: load_model either loads them or raises a ZeroQuantError (which the CLI turns into one
line and an exit code), never another exception, and never hangs."""

import io
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from zeroquant.errors import ZeroQuantError
from zeroquant.zoo.loading import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TIME_LIMIT_S = 30


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the loader can hide it."""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[bytes, str | None]]:
    """Valid inputs, as bytes, with the --arch each needs: a small export archive and a real state_dict."""
    folder = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    archive, state_dict = folder / "model.pt2", folder / "state_dict.pt"
    torch.export.save(torch.export.export(model.eval(), (torch.randn(1, 3, 8, 8),)), archive)
    checkpoint = torch.load(SHARED / "models" / "cifar10" / "resnet20.th", map_location="cpu", weights_only=True)
    torch.save(checkpoint["state_dict"], state_dict)  # the zip format torch.save writes today
    return {"archive": (archive.read_bytes(), None), "state_dict": (state_dict.read_bytes(), "resnet20_cifar10")}


def mutate(data: bytes, kind: str, position: int, payload: bytes) -> bytes:
    """Truncate, overwrite bytes, or drop / replace one zip member (rewritten with zipfile)."""
    if kind == "truncate":
        return data[: position % len(data)]
    if kind == "flip":
        start = position % len(data)
        flipped = bytes(a ^ (b or 1) for a, b in zip(data[start:], payload))
        return data[:start] + flipped + data[start + len(flipped):]
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        members = source.infolist()
        victim = members[position % len(members)]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as target:
            for member in members:
                if member is not victim:
                    target.writestr(member, source.read(member))
                elif kind == "replace":
                    target.writestr(member, payload)
    return buffer.getvalue()


@pytest.fixture
def hang_alarm():
    """SIGALRM raises Hang; the test sets the alarm around each load."""
    def ring(signum, frame):
        raise Hang(f"load_model ran for more than {TIME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, ring)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["archive", "state_dict"]),
       kind=st.sampled_from(["truncate", "flip", "drop", "replace"]),
       position=st.integers(min_value=0, max_value=2**31),
       payload=st.binary(min_size=1, max_size=64))
def test_damaged_file_loads_or_raises_zeroquant_error(files, tmp_path, capsys, hang_alarm, which, kind, position,
                                                      payload):
    data, arch = files[which]
    path = tmp_path / which
    path.write_bytes(mutate(data, kind, position, payload))
    signal.alarm(TIME_LIMIT_S)
    try:
        load_model(str(path), arch=arch)
    except ZeroQuantError:
        pass
    finally:
        signal.alarm(0)
    assert capsys.readouterr().err == ""  # the CLI's one error line must be all there is on stderr
