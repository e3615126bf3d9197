"""What the Python API must leave as it found it (issue 21): the cache key follows what is distilled (the captured
graph's code, its tensors, zeroquant's version), and the caller's module mode and global RNG stay untouched."""

import pytest
import torch
from torch import nn

import zeroquant
from tests.conftest import make_small_net
from zeroquant.pipeline import distill_calibration

SHAPE = (3, 16, 16)
FAST = dict(images=4, batch_size=4, iterations=3)


def twin(scale: float) -> nn.Module:
    """SmallNet with make_small_net's weights whose forward scales the input: the same repr and state_dict, another
    graph (a notebook user edited forward)."""

    class SmallNet(nn.Module):  # the same class name as the original on purpose: the reprs match
        def __init__(self):
            super().__init__()
            self.net = make_small_net()

        def forward(self, x):
            return self.net(x * scale)

    return SmallNet()


def test_same_weights_another_forward_get_other_images(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROQUANT_CACHE", str(tmp_path))
    first, second = twin(1.0), twin(3.0)
    assert repr(first) == repr(second)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    images_first, job, _ = distill_calibration(first, input_shape=SHAPE, **FAST)
    images_second, other, cached = distill_calibration(second, input_shape=SHAPE, **FAST)
    assert job.captured.digest != other.captured.digest
    assert not cached and not torch.equal(images_first.images, images_second.images)
    assert distill_calibration(twin(3.0), input_shape=SHAPE, **FAST)[2]  # the same graph again: from the cache


def test_another_zeroquant_version_distils_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROQUANT_CACHE", str(tmp_path))
    assert not distill_calibration(make_small_net(), input_shape=SHAPE, **FAST)[2]
    assert distill_calibration(make_small_net(), input_shape=SHAPE, **FAST)[2]
    monkeypatch.setattr(zeroquant, "__version__", zeroquant.__version__ + ".post1")
    assert not distill_calibration(make_small_net(), input_shape=SHAPE, **FAST)[2]


@pytest.mark.parametrize("mode", ["train", "mixed"])
def test_the_callers_module_mode_is_kept(mode):
    model = make_small_net()
    model.train()
    if mode == "mixed":
        model.stem.eval()
    before = {name: module.training for name, module in model.named_modules()}
    zeroquant.quantize(model, input_shape=SHAPE, **FAST)
    assert {name: module.training for name, module in model.named_modules()} == before


def test_the_global_rng_is_kept():
    """W4A4 runs block reconstruction with QDrop, which draws random masks; capture runs example inputs."""
    model = make_small_net()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    zeroquant.quantize(model, input_shape=SHAPE, wbits=4, abits=4, effort="fast", **FAST)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_result_does_not_depend_on_the_global_rng():
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        results.append(zeroquant.quantize(make_small_net(), input_shape=SHAPE, wbits=4, abits=4, effort="fast",
                                          **FAST).onnx)
    assert results[0] == results[1]
