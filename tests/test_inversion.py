"""The inversion distiller: each of its levers changes the images the way it is there for, on SmallNet."""

import pytest
import torch

from tests.conftest import make_small_net
from zeroquant.calib import DistillSettings
from zeroquant.calib.calibset import CalibSet, calib_set
from zeroquant.calib.inversion import InversionDistiller
from zeroquant.graph.capture import capture
from zeroquant.progress import SILENT

CPU = torch.device("cpu")
RANGE = ((-1.0, 1.0), (-0.5, 0.5), (0.0, 2.0))  # per channel, as a preprocessing's channel_ranges() gives


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invert(distiller: InversionDistiller, size: int, iterations: int, pixel_range=RANGE) -> tuple[CalibSet, object]:
    shape = (3, size, size)
    graph = capture(make_small_net(), shape).graph_module
    settings = DistillSettings(16, 16, iterations, 0.2, 0, pixel_range)
    return calib_set("inversion", settings, distiller.distill(graph, shape, settings, CPU, SILENT, [0])), graph


def roughness(images: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring pixels, relative to the images' spread: high for pixel noise."""
    rows = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    cols = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return float((rows + cols) / images.std())


@pytest.mark.parametrize("iterations", [0, 12])
def test_pixels_stay_in_the_preprocessing_range_and_the_bn_loss_falls(iterations):
    calib, _ = invert(InversionDistiller(), 16, iterations)
    low, high = torch.tensor(RANGE).T.view(2, 1, 3, 1, 1)
    assert bool((calib.images >= low).all() and (calib.images <= high).all())
    start, _ = invert(InversionDistiller(), 16, 0)
    if iterations:
        assert calib.final_loss < 0.75 * start.final_loss, (start.final_loss, calib.final_loss)


def test_the_output_loss_spreads_images_over_the_classes():
    """SmallNet's random logits span ~0.5, so the cross-entropy needs a large weight to show: without it every
    image lands in one class, with it at least 4 of the 5."""
    without, graph = invert(InversionDistiller(output_weight=0.0), 16, 30, None)
    with_loss, _ = invert(InversionDistiller(output_weight=100.0), 16, 30, None)
    with torch.no_grad():
        classes = [len(set(graph(c.images).argmax(1).tolist())) for c in (without, with_loss)]
    assert classes[0] == 1 and classes[1] >= 4, classes


def test_shifts_flips_and_a_coarse_start_smooth_the_pixels():
    """At 64 px: the random roll and flip, and half of the steps at half resolution, each leave smoother images
    than optimising the full-resolution pixels on one sampling grid."""
    coarse, _ = invert(InversionDistiller(coarse=0.5), 64, 30)
    still, _ = invert(InversionDistiller(coarse=0.5, shift=0.0, flip=False), 64, 30)
    fine, _ = invert(InversionDistiller(), 64, 30)
    assert roughness(coarse.images) < 0.95 * roughness(still.images)
    assert roughness(coarse.images) < 0.8 * roughness(fine.images)


def test_same_seed_same_images_and_the_levers_are_in_the_cache_key():
    first, _ = invert(InversionDistiller(), 16, 4)
    again, _ = invert(InversionDistiller(), 16, 4)
    assert torch.equal(first.images, again.images)
    keys = {str(d.key()) for d in (InversionDistiller(), InversionDistiller(shift=0.0), InversionDistiller(flip=False),
                                   InversionDistiller(output_weight=0.5), InversionDistiller(coarse=0.5))}
    assert len(keys) == 5
