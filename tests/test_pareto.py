"""Issue 4: mixed-precision weights. Exact frontier, budgets, sensitivity (against a plain full-model computation),
and the `pareto` and `quantize --budget` commands on a torch.export archive of SmallNet."""

import io
import itertools
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from PIL import Image
from rich.console import Console
from torch import nn

from tests.conftest import make_small_net
from zeroquant.search import selection
from zeroquant.cli.app import main
from zeroquant.cli.pareto import _table
from zeroquant.errors import UsageError
from zeroquant.graph.batchnorm import fold_batchnorm
from zeroquant.graph.capture import capture
from zeroquant import distill
from zeroquant.quant.sim import build_quantsim
from zeroquant.search.pareto import (Problem, below_safe_bits, choose, frontier, least_safe_cost, parse_budget,
                                     pareto_dp)
from zeroquant.search.sensitivity import layer_sensitivity

FAST = ["--iterations", "2", "--images", "8", "--batch-size", "8"]
CHOICES = (2, 3, 4, 5, 6, 8)


def brute_force_frontier(costs, values):
    totals = [(sum(c[j] for c, j in zip(costs, pick)), sum(v[j] for v, j in zip(values, pick)))
              for pick in itertools.product(range(costs.shape[1]), repeat=len(costs))]
    return sorted({(c, round(v, 9)) for c, v in totals
                   if not any(c2 <= c and v2 <= v and (c2, v2) != (c, v) for c2, v2 in totals)})


@pytest.mark.parametrize("seed", range(5))
def test_dp_is_exact(seed):
    rng = np.random.default_rng(seed)
    layers = rng.integers(3, 6)
    costs = np.sort(rng.integers(1, 30, (layers, 3)), axis=1) * rng.integers(1, 4)
    values = rng.random((layers, 3))
    cost, value, picks = pareto_dp(costs, values)
    assert list(zip(cost.tolist(), np.round(value, 9).tolist())) == brute_force_frontier(costs, values)
    rows = np.arange(layers)
    assert np.array_equal(costs[rows, picks].sum(1), cost) and np.allclose(values[rows, picks].sum(1), value)


def toy_problem(objective="size", layers=8, seed=0):
    rng = np.random.default_rng(seed)
    sensitivity = np.sort(rng.random((layers, len(CHOICES))), axis=1)[:, ::-1] * rng.random((layers, 1))
    return Problem([f"l{i}" for i in range(layers)], rng.integers(50, 5000, layers), rng.integers(10**4, 10**6, layers),
                   CHOICES, sensitivity, 8, objective)


def test_frontier_is_monotone_and_spans_all_configurations():
    problem = toy_problem()
    front = frontier(problem)
    assert np.all(np.diff(front.cost) > 0) and np.all(np.diff(front.sensitivity) < 0)
    assert front.points[0]["average_bits"] == 2 and front.points[-1]["average_bits"] == 8
    assert front.sensitivity[-1] == pytest.approx(problem.sensitivity.min(1).sum())
    assert front.seconds < 0.5


def test_budgets():
    problem, bops = toy_problem(), toy_problem("bops")
    params = problem.params.sum()
    assert parse_budget("4.5").cost(problem) == 4.5 * params
    assert parse_budget("200KB").cost(problem) == 200e3 * 8 and parse_budget("1 MiB").cost(problem) == 2**23
    assert parse_budget("3.5GBOPs", objective="bops").cost(bops) == 3.5e9
    front = frontier(problem)
    index = choose(front, parse_budget("4.5").cost(problem))
    assert front.cost[index] <= 4.5 * params < (front.cost[index + 1] if index + 1 < len(front.cost) else np.inf)
    assert choose(front, 100 * params) == len(front.cost) - 1
    with pytest.raises(UsageError, match="below the smallest.*feasible budgets: 3 to 8 average bits"):
        parse_budget("2.5", (3, 4, 8))
    with pytest.raises(UsageError, match="below the smallest.*feasible budgets: 2 average bits"):
        parse_budget(f"{params / 4 - 1}B").cost(problem)
    with pytest.raises(UsageError, match="objective is bops"):
        parse_budget("0.2MB", objective="bops")
    for text in ("fast", "4.5 bits", "-3", "2MBOP"):
        with pytest.raises(UsageError, match="cannot read --budget"):
            parse_budget(text)


class ViewNet(nn.Module):
    """Reads the batch size (`x.size(0)`), which the batched sensitivity pass must recompute, not reuse."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = self.conv(x)
        return self.head(x.view(x.size(0), -1))


def naive_sensitivity(sim, images):
    """The definition, one full forward per (layer, bits)."""
    sim.set_enabled(weights=False, activations=False)
    with torch.no_grad():
        log_p = F.log_softmax(sim(images).double(), 1)
        table = np.zeros((len(sim.layers), len(CHOICES)))
        for row, layer in enumerate(sim.layers.values()):
            layer.enabled = True
            for col, bits in enumerate(CHOICES):
                layer.set_bits(bits)
                log_q = F.log_softmax(sim(images).double(), 1)
                table[row, col] = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True).item()
            layer.enabled = False
            layer.set_bits(8)
    return table


@pytest.fixture(scope="module")
def small_net_graph():
    return capture(make_small_net(), (3, 16, 16)).graph_module


@pytest.mark.parametrize("net", ["small", "view"])
def test_sensitivity_matches_the_definition(net, small_net_graph):
    graph_module, shape = (small_net_graph, (3, 16, 16)) if net == "small" else (
        capture(ViewNet().eval(), (3, 8, 8)).graph_module, (3, 8, 8))
    sim = build_quantsim(fold_batchnorm(graph_module)[0])
    images = torch.randn(6, *shape)
    measured = layer_sensitivity(sim, images, CHOICES)
    table = np.stack([measured[row] for row in range(len(sim.layers))])
    assert np.allclose(table, naive_sensitivity(sim, images), rtol=1e-3, atol=1e-9)
    assert layer_sensitivity(sim, images, CHOICES, rows=[1]).keys() == {1}  # a process's share of the rows


def test_sensitivity_on_distilled_small_net(small_net_graph):
    images = distill(make_small_net(), input_shape=(3, 16, 16), images=8, batch_size=8, iterations=2)
    measured = layer_sensitivity(build_quantsim(fold_batchnorm(small_net_graph)[0]), images, CHOICES)
    table = np.stack([measured[row] for row in sorted(measured)])
    assert table.shape == (5, len(CHOICES)) and np.all(table >= 0)
    assert np.all(table[:, 0] > table[:, -1])
    assert np.mean(np.diff(table, axis=1) < 0) >= 0.8, table


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "small.pt2"
    exported = torch.export.export(make_small_net(), (torch.randn(2, 3, 16, 16),),
                                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(exported, path)
    return path


def test_pareto_cli_writes_plot_and_frontier(archive, tmp_path, capsys):
    out = tmp_path / "pareto"
    assert main(["pareto", str(archive), "-o", str(out), "--budget", "4.5", "--json", *FAST]) == 0
    printed = json.loads(capsys.readouterr().out)
    data = json.loads((out / "pareto.json").read_text())
    assert printed == data
    front = data["frontier"]
    assert [p["size_bytes"] for p in front] == sorted(p["size_bytes"] for p in front)
    assert all(set(p["bits"]) == {layer["name"] for layer in data["layers"]} for p in front)
    first, last = data["layers"][0]["name"], data["layers"][-1]["name"]
    # searched like the rest (the classifier of Lite0 is 28 % of its weights): the smallest point has them at 2 bits
    assert front[0]["bits"][first] == front[0]["bits"][last] == 2 and front[-1]["bits"][last] == 8
    chosen = front[data["chosen"]]
    assert chosen["average_bits"] <= 4.5 and "measured" in chosen
    assert sum("measured" in p for p in front) >= 3 and all("measured" in p for p in data["uniform"])
    # the measurements measure: more bits, less divergence from the float model (measured KL 1.8e-4 at W2 down
    # to 2.7e-7 at W8); the chosen 4.5-bit point below W3's; quantized activations add to the weights' error.
    # Monotone up to W4: from W5 on, GPTQ's float-target fit on 16 images leaves differences within their noise
    # (W5 1.8e-5, W6 2.0e-5), all far above W8's
    uniform = sorted(data["uniform"], key=lambda p: sum(p["bits"].values()))
    kl = [p["measured"]["weights_only"]["kl"] for p in uniform]
    assert kl[:3] == sorted(kl[:3], reverse=True) and min(kl[:-1]) > 10 * kl[-1] and kl[0] > 100 * kl[-1], kl
    assert chosen["measured"]["weights_only"]["kl"] < uniform[1]["measured"]["weights_only"]["kl"]
    assert uniform[-1]["measured"]["with_activations"]["top1_agreement"] >= 95
    console = Console(width=80, soft_wrap=True, file=io.StringIO())  # as zeroquant's stdout off a terminal
    console.print(_table(data, out))
    text = console.file.getvalue()  # every column, even at 80 columns
    assert f"{data['chosen'] + 1} *" in text and "uniform W8" in text
    assert "".join(map(str, chosen["bits"].values())) in text
    assert (out / "pareto.png").stat().st_size > 10_000
    with Image.open(out / "pareto.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 1000


def test_quantize_budget_exports_each_layer_on_its_grid(archive, tmp_path, capsys):
    out = tmp_path / "mixed.onnx"
    assert main(["quantize", str(archive), "-o", str(out), "--budget", "4.5", "--reconstruct", "off", "--json",
                 *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any(note.startswith("mixed_precision: --budget 4.5") for note in report["notes"])
    # the frontier's choice was measured against uniform W4 (the largest uniform width within 4.5 bits)
    (measured,) = [n for n in report["notes"] if n.startswith("mixed_precision: measured as exported")]
    found = re.findall(r"(frontier point \d+|uniform W\d): KL ([\d.e-]+)", measured)
    scores = {label: float(kl) for label, kl in found}
    assert len(scores) == 2 and measured.endswith(f"kept {min(scores, key=scores.get)}")
    bits = report["settings"]["layer_bits"]  # keyed like the ONNX initializers: module path with "_" for "."
    assert sorted(bits.values()) == sorted(layer["weight_bits"] for layer in report["layers"])  # as chosen
    assert len(set(bits.values())) > 1
    # --keep-first-last 8 keeps the inputs of the first and last layer at 8 bits; their weights are the search's
    first, last = report["layers"][0], report["layers"][-1]
    assert first["input_bits"] == last["input_bits"] == 8
    given = [n for n in report["notes"] if n.startswith("the first and last layers")]
    assert given and (min(first["weight_bits"], last["weight_bits"]) == 8 or "the --budget search gives" in given[0])
    model = onnx.load(out)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith(".weight")}
    for name, b in bits.items():
        values = weights[f"{name}.weight"]
        assert values.dtype == np.int8 and np.abs(values).max() <= 2 ** (b - 1) - 1
    sizes = {name: weights[f"{name}.weight"].size for name in bits}
    assert sum(sizes[n] * b for n, b in bits.items()) <= 4.5 * sum(sizes.values())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.random.default_rng(0).standard_normal((2, 3, 16, 16), np.float32)})[0]
    assert logits.shape == (2, 5) and np.isfinite(logits).all()
    assert main(["quantize", str(archive), "-o", str(tmp_path / "no.onnx"), "--budget", "1.5", *FAST]) == 2
    assert "feasible budgets: 2 to 8 average bits" in capsys.readouterr().err and not (tmp_path / "no.onnx").exists()


def test_a_budget_forcing_layers_below_four_bits_names_the_smallest_that_does_not():
    problem = toy_problem()
    safe = least_safe_cost(problem)
    assert safe == 4 * problem.params.sum()  # every layer at 4 bits
    front = frontier(problem)
    assert below_safe_bits(problem, front.points[choose(front, safe)], "x", safe) is None
    low = choose(front, safe - 1)
    forced = [name for name, bits in front.points[low]["bits"].items() if bits < 4]
    warning = below_safe_bits(problem, front.points[low], "3.9", safe - 1)
    assert forced and f"forces {len(forced)} of 8 layers" in warning
    assert f"every layer at 4+ bits is {safe / problem.params.sum():.3g} average bits" in warning


def test_a_collapsed_budget_is_refused_and_a_forcing_one_warned(archive, tmp_path, capsys, monkeypatch):
    """A budget forcing layers below 4 bits is warned about on stderr, with the smallest budget that does not. A model
    agreeing with the float one on fewer held-out images than MIN_AGREEMENT is refused and nothing written (SmallNet
    at 2 bits does not collapse, so the bar is raised above what it measures, 100 %, to reach the refusal)."""
    out = tmp_path / "mixed.onnx"
    assert main(["quantize", str(archive), "-o", str(out), "--budget", "3.5", "--keep-first-last", "2",
                 "--reconstruct", "off", *FAST]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: --budget 3.5 forces \d+ of 5 layers .* every layer at 4\+ bits is 4 average", err)
    assert out.exists()
    assert main(["quantize", str(archive), "-o", str(out), "--budget", "6", "--keep-first-last", "2",
                 "--reconstruct", "off", *FAST]) == 0
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setattr(selection, "MIN_AGREEMENT", 100.1)
    before = out.read_bytes()
    assert main(["quantize", str(archive), "-o", str(out), "--budget", "3.5", "--keep-first-last", "2",
                 "--reconstruct", "off", *FAST]) == 2
    err = capsys.readouterr().err
    assert re.search(r"agrees with the float one on only \d+ % of 4 held-out distilled images .* has collapsed, "
                     r"nothing was written", err) and "every layer at 4+ bits from 4 average bits" in err
    assert out.read_bytes() == before
