"""Genie distillation: generator + latents against the BN statistics, with swing convolutions."""

import pytest
import torch

from zeroquant.calib import DistillSettings
from zeroquant.calib.calibset import calib_set
from zeroquant.calib.matching import tap_batchnorms
from zeroquant.calib.genie import GenieDistiller, Swing, swing_strided_convs
from zeroquant.graph.capture import capture
from zeroquant.progress import SILENT, Progress

SHAPE = (3, 16, 16)
CPU = torch.device("cpu")
aten = torch.ops.aten


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, and on a busy machine it costs 5-10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def genie(gm, settings, progress=SILENT):
    """The whole set, as zeroquant.calib.distill puts the batches together."""
    batches = GenieDistiller().distill(gm, SHAPE, settings, CPU, progress, list(range(len(settings.batch_sizes()))))
    return calib_set("genie", settings, batches)


def captured(small_net):
    return capture(small_net, SHAPE).graph_module


def convs(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.conv2d.default]


def test_distillation_lowers_the_bn_loss(small_net):
    gm = captured(small_net)
    start = genie(gm, DistillSettings(8, 8, 0, 0.2, 0))
    end = genie(gm, DistillSettings(8, 8, 40, 0.2, 0))
    assert end.final_loss < 0.5 * start.final_loss, (start.final_loss, end.final_loss)
    assert set(end.layer_mismatch) == set(start.layer_mismatch) and len(end.layer_mismatch) == 4
    # the model handed in is untouched: swing lives only in the distillation copy
    assert not any("swing" in name for name, _ in gm.named_modules())


def test_same_seed_same_images(small_net):
    gm = captured(small_net)
    runs = [genie(gm, DistillSettings(8, 8, 6, 0.2, seed))
            for seed in (3, 3, 4)]
    assert torch.equal(runs[0].images, runs[1].images)
    assert runs[0].final_loss == runs[1].final_loss
    assert not torch.equal(runs[0].images, runs[2].images)


def test_calib_set_size_and_shape(small_net):
    settings = DistillSettings(num_images=10, batch_size=4, iterations=3, lr=0.2, seed=0)
    calib = genie(captured(small_net), settings)
    assert calib.images.shape == (10, *SHAPE) and calib.images.dtype == torch.float32
    assert calib.method == "genie" and calib.settings == settings.key()
    assert torch.isfinite(calib.images).all() and calib.final_loss == calib.final_loss


def test_progress_advances_once_per_step(small_net):
    events = []
    genie(captured(small_net), DistillSettings(6, 4, 4, 0.2, 0), Progress(events.append))
    assert [e.done for e in events] == list(range(2 * 4 + 1)) + [2 * 4]
    assert {e.total for e in events} == {2 * 4} and events[-1].finished and not any(e.finished for e in events[:-1])


def test_swing_wraps_only_strided_convs(small_net):
    tapped, _ = tap_batchnorms(captured(small_net))
    reference, _ = tap_batchnorms(captured(small_net))
    before = {n.name: n.args[0] for n in convs(tapped)}
    names = swing_strided_convs(tapped, torch.Generator().manual_seed(0), max_shift=0)
    assert len(names) == 1  # SmallNet: only the depthwise conv has stride 2
    for conv in convs(tapped):
        source = conv.args[0]
        if len(conv.args) > 3 and max(conv.args[3]) > 1:
            assert source.op == "call_module" and source.target in names
            assert isinstance(tapped.get_submodule(source.target), Swing)
            assert source.args[0] is before[conv.name]
        else:
            assert source is before[conv.name]
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(tapped(x), reference(x))  # a zero shift changes nothing


def test_swing_shifts_within_one_pixel():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(1, 2, 5, 6)
    swing = Swing(torch.Generator().manual_seed(0), max_shift=1)
    outputs = []
    for _ in range(30):
        swing.resample()
        outputs.append(swing(x))
    assert all(o.shape == x.shape for o in outputs)
    assert any(not torch.equal(o, x) for o in outputs) and any(torch.equal(o, x) for o in outputs)
    for o in outputs:  # every output is the input moved by at most one pixel: the interior is a shifted copy
        assert any(torch.equal(o[..., 1:-1, 1:-1], x[..., 1 + dy:4 + dy, 1 + dx:5 + dx])
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))
