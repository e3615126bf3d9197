"""Activation range methods: the BN-derived (analytic) histogram, the per-tensor choice, and where priors attach."""

import math

import pytest
import torch
from torch import nn

from tests.conftest import make_small_net
from zeroquant.graph.batchnorm import fold_batchnorm
from zeroquant.graph.capture import capture
from zeroquant.quant.calibrate import calibrate
from zeroquant.quant.ranges import ChannelGaussians, HistogramObserver, choose_range, relative_mse
from zeroquant.quant.sim import build_quantsim


def _observed(values: torch.Tensor) -> HistogramObserver:
    obs = HistogramObserver()
    obs(values)
    obs.start_histogram()
    obs(values)
    return obs


def test_gaussian_histogram_matches_sampling():
    """Two channels N(1, 2) and N(-3, 0.5) under a ReLU6: the analytic histogram has the mass of samples."""
    prior = ChannelGaussians(torch.tensor([1.0, -3.0]), torch.tensor([2.0, 0.5]), 0.0, 6.0)
    hist = prior.histogram()
    assert (hist.low, hist.high) == (0.0, 6.0)
    mass = hist.hist / hist.hist.sum()
    at_zero = (torch.special.ndtr(torch.tensor(-0.5)) + 1.0) / 2  # channel 1 below 0, and all of channel 2
    assert math.isclose(float(mass[0]), float(at_zero), abs_tol=2e-3)
    at_six = (1 - torch.special.ndtr(torch.tensor(2.5))) / 2
    assert math.isclose(float(mass[-1]), float(at_six), abs_tol=2e-3)
    samples = torch.cat([torch.randn(200_000) * 2 + 1, torch.randn(200_000) * 0.5 - 3]).clamp(0, 6)
    mean = float((mass * hist.centers()).sum())
    assert math.isclose(mean, float(samples.mean()), rel_tol=0.02)


def test_choose_range_methods():
    torch.manual_seed(0)
    values = torch.randn(20_000).clamp_min(0)
    values[0] = 40.0  # one outlier: minmax keeps it, mse clips it
    observed = _observed(values)
    prior = ChannelGaussians(torch.zeros(1), torch.ones(1), 0.0, math.inf)
    (low, high), name = choose_range("minmax", observed, prior, 8)
    assert (name, high) == ("minmax", 40.0)
    (_, high), name = choose_range("mse", observed, None, 4)  # at 4 bits, clipping one outlier costs less
    assert name == "mse" and high < 10
    (_, high), name = choose_range("analytic", observed, prior, 8)
    assert name == "analytic" and 2.5 < high < 6.5  # from N(0, 1) alone: the outlier is not seen
    assert choose_range("analytic", observed, None, 8)[1] == "mse"  # no BN describes the tensor
    # auto: the candidate with the least error on the data and on what the BN statistics describe, not any method
    bounds, name = choose_range("auto", observed, prior, 4)
    candidates = {method: choose_range(method, observed, prior, 4)[0]
                  for method in ("minmax", "percentile", "mse", "analytic")}

    def error(low_high) -> float:
        return relative_mse(observed, *low_high, 4) + relative_mse(prior.histogram(), *low_high, 4)

    assert bounds == candidates[name] and error(bounds) == min(map(error, candidates.values()))
    assert error(bounds) < error(candidates["minmax"]) and bounds[1] < 40.0  # keeping the outlier costs


def test_priors_attach_to_conv_bn_outputs_and_calibrate_reports_choices():
    model = make_small_net()
    folded, _ = fold_batchnorm(capture(model, (3, 16, 16)).graph_module)
    sim = build_quantsim(folded, 8, 8)
    priors = {name: q.prior for name, q in sim.activations.items() if q.prior is not None}
    assert priors, "conv+BN outputs must carry their BN-derived distribution"
    bounds = {(p.low, p.high) for p in priors.values()}
    assert (0.0, 6.0) in bounds  # the ReLU6 after the depthwise conv
    assert any(math.isinf(high) for _, high in bounds)  # a plain ReLU / no activation
    chosen = calibrate(sim, torch.randn(8, 3, 16, 16), "auto")
    assert set(chosen) == set(sim.activations)
    assert set(chosen.values()) <= {"minmax", "percentile", "mse", "analytic"}


def test_cross_layer_equalization_is_exact_and_equalizes():
    from zeroquant.quant.equalize import equalization_pairs, equalize

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), bn(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), bn(8), torch.nn.ReLU(),  # depthwise second, then first
        torch.nn.ZeroPad2d(1), torch.nn.Conv2d(8, 16, 3, groups=2), bn(16), torch.nn.ReLU6(),  # ReLU6: no pair
        torch.nn.Conv2d(16, 4, 1))
    with torch.no_grad():
        for module in model:
            if isinstance(module, bn):
                module.weight.uniform_(0.1, 3)
                module.running_var.uniform_(0.5, 2)
    model.eval()
    folded, _ = fold_batchnorm(capture(model, (3, 12, 12)).graph_module)
    x = torch.randn(4, 3, 12, 12)
    expected = folded(x)
    pairs = equalization_pairs(folded)
    assert len(pairs) == 2
    assert equalize(folded) == 2
    torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
    first, second = pairs[1]  # depthwise -> (pad) -> grouped conv
    w1 = getattr(folded, first.args[1].target).abs().flatten(1).amax(1)
    w2 = getattr(folded, second.args[1].target).reshape(2, 8, 4, -1).abs().amax(dim=(1, 3)).reshape(-1)
    torch.testing.assert_close(w1, w2)


def test_analytic_bias_correction_matches_the_measured_shift_on_bn_matched_inputs():
    """On inputs whose statistics are the BN's (a conv+BN+ReLU fed noise it was trained on), the analytic shift of
    the layer after it equals the measured one up to sampling and border effects."""
    from zeroquant.quant.bias_correction import analytic_shift, weight_error_shift

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 6, 3))
    x = torch.randn(64, 3, 16, 16)
    model.train()
    with torch.no_grad():
        model[1].momentum = None  # cumulative average: the running statistics are those of x exactly
        model(x)
    model.eval()
    sim = build_quantsim(fold_batchnorm(capture(model, (3, 16, 16)).graph_module)[0], 4, 8)
    name = list(sim.layers)[1]
    layer, prior = sim.layers[name], sim.activations[sim.layer_inputs[name]].prior
    with torch.no_grad():
        hidden = torch.relu(model[1](model[0](x)))
    measured = weight_error_shift(layer, hidden)
    torch.testing.assert_close(analytic_shift(layer, prior.expected_mean()), measured, rtol=0.15, atol=2e-3)


def test_bias_correction_changes_only_the_quantized_path():
    """Reconstruction takes its targets from the simulation's float path, so bias correction must leave it alone
    (when it shifted the float biases too, EfficientNet-Lite0 W4A8 reconstructed towards a wrong model: 8.8 %)."""
    from zeroquant.quant.bias_correction import correct_biases

    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for analytic in (False, True):
        sim = build_quantsim(fold_batchnorm(capture(make_small_net(), (3, 16, 16)).graph_module)[0], 4, 8)
        calibrate(sim, x)
        with torch.no_grad():
            sim.set_enabled(weights=False, activations=False)
            float_before = sim(x)
            sim.set_enabled(weights=True, activations=True)
            quantized_before = sim(x)
            correct_biases(sim, x, analytic=analytic)
            quantized_after = sim(x)
            sim.set_enabled(weights=False, activations=False)
            torch.testing.assert_close(sim(x), float_before, rtol=0, atol=0)
        assert all(layer.bias_shift.abs().max() > 0 for layer in sim.layers.values()), analytic
        assert not torch.equal(quantized_after, quantized_before), analytic


@pytest.mark.parametrize("mode, follows_images", [("auto", False), ("on", True)])
def test_default_bias_correction_follows_the_bn_statistics_not_the_images(mode, follows_images):
    """Distilled images' channel means are not the training data's (Lite0 W4A8: the shift measured on them cost 2
    points more than the BN-derived one), so by default a layer fed by a BN takes its shift from the statistics:
    calibration images with other channel means leave it unchanged. W8A8 nearest rounding: the weight grid does not
    depend on the images, only the correction can."""
    from zeroquant.options import QuantizeOptions
    from zeroquant.pipeline import prepare, start
    from zeroquant.zoo.loading import LoadedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1))
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 16, 16))
    model.eval()
    job = start(LoadedModel(model, "dw", (3, 16, 16), None, None), None,
                QuantizeOptions(bias_correction=mode, cache=False), {})
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    shifts = []
    for calibration in (images, images * 0.5 + 0.7):
        sim = prepare(job, calibration).sim
        shifts.append({name: layer.bias_shift.clone() for name, layer in sim.layers.items()})
    fed_by_bn = [name for name, feeding in sim.layer_inputs.items()
                 if feeding and sim.activations[feeding].prior is not None]
    assert fed_by_bn
    for name in fed_by_bn:
        assert shifts[0][name].abs().max() > 0
        assert torch.equal(shifts[0][name], shifts[1][name]) != follows_images, name


class SplitConvs(nn.Module):
    """MixNet's mixed conv: one BN output split into channel groups, each read by its own conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        first, second = self.stem(x).split(8, dim=1)
        return torch.cat([self.depthwise(first), self.pointwise(second)], 1)


def test_analytic_bias_correction_measures_layers_behind_a_split():
    """The prior describes the whole BN output; a conv reading a split of it is measured (it crashed: 16 prior
    channels against 8 input channels, on timm's mixnet_s)."""
    from zeroquant.options import QuantizeOptions
    from zeroquant.pipeline import prepare, start
    from zeroquant.zoo.loading import LoadedModel

    torch.manual_seed(0)
    model = SplitConvs()
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8))
    model.eval()
    job = start(LoadedModel(model, "split", (3, 8, 8), None, None), None, QuantizeOptions(cache=False), {})
    sim = prepare(job, torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))).sim
    assert all(layer.bias_shift.abs().max() > 0 for layer in sim.layers.values())


def test_input_statistics_from_the_first_batchnorm():
    """The first conv + BN's running statistics imply the input's mean and scale: trained on smooth images of known
    statistics (per-channel means 0.3, -0.2, 0.1; std 0.5), the estimate lands near them."""
    from zeroquant.graph.batchnorm import input_statistics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.Flatten(),
                          nn.Linear(24 * 32 * 32, 4))
    offsets = torch.tensor([0.3, -0.2, 0.1]).reshape(1, 3, 1, 1)
    model.train()
    with torch.no_grad():
        for _ in range(50):
            smooth = nn.functional.interpolate(torch.randn(16, 3, 8, 8), size=32, mode="bilinear")
            model(offsets + 0.5 * smooth / smooth.std())
    stats = input_statistics(capture(model.eval(), (3, 32, 32)).graph_module)
    torch.testing.assert_close(stats.mean, offsets.flatten(), atol=0.05, rtol=0)
    assert 0.35 < float(stats.std[0]) < 0.7
    low, high = stats.range()
    assert low == pytest.approx(float((stats.mean - 2.0 * stats.std).min())) and high > low


def test_the_input_quantizer_takes_the_known_range(tmp_path):
    import zeroquant

    fast = dict(input_shape=(3, 16, 16), images=8, batch_size=8, iterations=5)
    given = zeroquant.quantize(make_small_net(), input_range=(-1.0, 1.0), **fast).report
    assert given.layers[0].input_range == pytest.approx([-1.0, 1.0], abs=2 / 255)
    assert any(note.startswith("input range [") and "given (--input-range)" in note for note in given.notes)
    estimated = zeroquant.quantize(make_small_net(), **fast).report
    assert any("estimated from the first conv + BN" in note for note in estimated.notes)
    with pytest.raises(zeroquant.UsageError, match="--input-range must be LOW,HIGH"):
        zeroquant.quantize(make_small_net(), input_range=(1.0, -1.0), **fast)
