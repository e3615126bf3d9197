"""The distillation core: micro-batches give the whole batch's loss and gradient (memory without approximation), and
every batch is a function of the seed and its index only (what lets several processes share the work)."""

import pytest
import torch

from tests.conftest import make_small_net
from zeroquant.calib import DISTILLERS, DistillSettings
from zeroquant.calib.matching import BatchNormMatcher
from zeroquant.graph.capture import capture
from zeroquant.progress import SILENT

SHAPE = (3, 16, 16)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def graph():
    return capture(make_small_net(), SHAPE).graph_module


def test_micro_batches_give_the_whole_batch_loss_and_gradient(graph):
    images = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(0))
    whole = BatchNormMatcher(graph, SHAPE, CPU)
    assert whole.micro_batch >= 12
    micro = BatchNormMatcher(graph, SHAPE, CPU, memory_budget=5 * whole.bytes_per_image(SHAPE))
    assert micro.micro_batch == 5  # three micro-batches: 5, 5, 2
    full, split = whole.step(images), micro.step(images)
    assert split.loss == pytest.approx(full.loss, rel=1e-5)
    assert split.layers == pytest.approx(full.layers, rel=1e-5)
    torch.testing.assert_close(split.grad, full.grad, rtol=1e-4, atol=1e-6)
    assert micro.measure(images)[0] == pytest.approx(full.loss, rel=1e-5)


def test_a_layers_emphasis_weighs_its_gradient_not_the_loss_reported(graph):
    """Inversion weighs the first BN layer more; micro-batches must weigh it the same, and the loss it reports stays
    the plain one, comparable between distillers."""
    images = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(0))
    plain = BatchNormMatcher(graph, SHAPE, CPU).step(images)
    whole = BatchNormMatcher(graph, SHAPE, CPU)
    micro = BatchNormMatcher(graph, SHAPE, CPU, memory_budget=5 * whole.bytes_per_image(SHAPE))
    for matcher in (whole, micro):
        matcher.taps[0].emphasis = 10.0
    full, split = whole.step(images), micro.step(images)
    assert full.loss == pytest.approx(plain.loss, rel=1e-6) and split.loss == pytest.approx(plain.loss, rel=1e-5)
    torch.testing.assert_close(split.grad, full.grad, rtol=1e-4, atol=1e-6)
    assert (full.grad - plain.grad).norm() > 0.1 * plain.grad.norm()


def test_saved_activations_grow_with_resolution(graph):
    matcher = BatchNormMatcher(graph, SHAPE, CPU)
    assert matcher.bytes_per_image((3, 32, 32)) > 3.5 * matcher.bytes_per_image(SHAPE)


@pytest.mark.parametrize("method", ["zeroq", "genie", "noise", "inversion"])
def test_a_batch_depends_only_on_the_seed_and_its_index(graph, method):
    distiller = DISTILLERS[method]
    both = distiller.distill(graph, SHAPE, DistillSettings(8, 4, 3, 0.2, 7), CPU, SILENT, [0, 1])
    alone = distiller.distill(graph, SHAPE, DistillSettings(8, 4, 3, 0.2, 7), CPU, SILENT, [1])
    first = distiller.distill(graph, SHAPE, DistillSettings(4, 4, 3, 0.2, 7), CPU, SILENT, [0])
    assert torch.equal(both[0].images, first[0].images) and torch.equal(both[1].images, alone[1].images)
    assert not torch.equal(both[0].images, both[1].images)


def test_bfloat16_steps_follow_the_float32_loss_and_gradient_and_keep_half_the_activations(graph):
    """Autocast runs the convolutions in bfloat16 (AMX's fast path): the loss and its gradient stay those of float32
    to bfloat16's precision, micro-batches still add up to the whole batch, the reported loss is float32's, and each
    image keeps about half the bytes for the backward pass, so more of a batch fits in one pass."""
    images = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(0))
    exact = BatchNormMatcher(graph, SHAPE, CPU).step(images)
    whole = BatchNormMatcher(graph, SHAPE, CPU, precision="bfloat16")
    micro = BatchNormMatcher(graph, SHAPE, CPU, memory_budget=5 * whole.bytes_per_image(SHAPE), precision="bfloat16")
    assert micro.micro_batch == 5
    full, split = whole.step(images), micro.step(images)
    for step in (full, split):
        assert step.grad.dtype == torch.float32
        assert step.loss == pytest.approx(exact.loss, rel=0.02)
        cosine = torch.nn.functional.cosine_similarity(step.grad.flatten(), exact.grad.flatten(), dim=0)
        assert cosine > 0.99
    assert split.loss == pytest.approx(full.loss, rel=1e-3)
    assert whole.measure(images)[0] == pytest.approx(exact.loss, rel=1e-5)  # the reported loss is float32's
    assert whole.bytes_per_image(SHAPE) < 0.7 * BatchNormMatcher(graph, SHAPE, CPU).bytes_per_image(SHAPE)


def test_the_precision_is_part_of_the_settings_that_key_the_cache():
    assert DistillSettings(precision="bfloat16").key() != DistillSettings().key()

