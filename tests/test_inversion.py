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
    plain = dict(first_bn=1.0, smooth_start=1)  # the output loss alone
    without, graph = invert(InversionDistiller(output_weight=0.0, **plain), 16, 30, None)
    with_loss, _ = invert(InversionDistiller(output_weight=100.0, **plain), 16, 30, None)
    with torch.no_grad():
        classes = [len(set(graph(c.images).argmax(1).tolist())) for c in (without, with_loss)]
    assert classes[0] == 1 and classes[1] >= 4, classes


def test_shifts_flips_and_a_coarse_start_smooth_the_pixels():
    """At 64 px: the random roll and flip, and half of the steps at half resolution, each leave smoother images
    than optimising the full-resolution pixels on one sampling grid."""
    pixel_start = dict(smooth_start=1, tv=0.0)
    coarse, _ = invert(InversionDistiller(coarse=0.5, **pixel_start), 64, 30)
    still, _ = invert(InversionDistiller(coarse=0.5, shift=0.0, flip=False, **pixel_start), 64, 30)
    fine, _ = invert(InversionDistiller(**pixel_start), 64, 30)
    assert roughness(coarse.images) < 0.95 * roughness(still.images)
    assert roughness(coarse.images) < 0.8 * roughness(fine.images)


def test_a_smooth_start_and_total_variation_smooth_the_pixels():
    """At 64 px: starting from noise drawn 8x coarser and penalising neighbour differences each leave smoother
    images than pixel noise optimised freely (what ZeroQ-style images at 224 px look like: noise)."""
    fine, _ = invert(InversionDistiller(smooth_start=1, tv=0.0), 64, 20)
    smooth_start, _ = invert(InversionDistiller(smooth_start=8, tv=0.0), 64, 20)
    penalised, _ = invert(InversionDistiller(smooth_start=1, tv=0.5), 64, 20)
    assert roughness(smooth_start.images) < 0.85 * roughness(fine.images)  # measured 0.74x (start: 0.12x)
    assert roughness(penalised.images) < 0.85 * roughness(fine.images)  # measured 0.74x


def test_weighing_the_first_bn_matches_its_statistics_better():
    """The first BN layer is a small share of the summed loss (Lite0: 2 of ~800 on real photos), so plain matching
    leaves its statistics, the images' low-level ones, as far off as noise's; weighing it 10x brings them closer."""
    plain, _ = invert(InversionDistiller(first_bn=1.0), 16, 12)
    weighed, _ = invert(InversionDistiller(first_bn=10.0), 16, 12)
    first = next(iter(plain.layer_mismatch))
    assert weighed.layer_mismatch[first] < 0.8 * plain.layer_mismatch[first], (plain.layer_mismatch,
                                                                               weighed.layer_mismatch)


def test_smoothing_is_on_by_default_only_for_photo_sized_inputs():
    assert InversionDistiller().smoothing((3, 224, 224)) == 0.5
    assert InversionDistiller().smoothing((3, 32, 32)) == 0.0
    assert InversionDistiller(tv=0.2).smoothing((3, 32, 32)) == 0.2


def test_same_seed_same_images_and_the_levers_are_in_the_cache_key():
    first, _ = invert(InversionDistiller(), 16, 4)
    again, _ = invert(InversionDistiller(), 16, 4)
    assert torch.equal(first.images, again.images)
    keys = {str(d.key()) for d in (InversionDistiller(), InversionDistiller(shift=0.0), InversionDistiller(flip=False),
                                   InversionDistiller(output_weight=0.5), InversionDistiller(coarse=0.5),
                                   InversionDistiller(first_bn=2.0), InversionDistiller(tv=0.2),
                                   InversionDistiller(smooth_start=4))}
    assert len(keys) == 8
