"""Per-layer sensitivity (ZeroQ's metric): the KL divergence from the FP32 output distribution to the one of the model
with only that layer's weights quantized at b bits, on the distilled images; activations stay float.

Cost: one float pass keeps every node's value; then, per layer, only the nodes downstream of it run (torch.fx partial
evaluation), once for all bit-widths stacked along the batch (larger batches use the CPU better than several small
passes); everything upstream or on parallel branches comes from the float pass.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch.fx import Interpreter

from zeroquant.distributed import Workers
from zeroquant.errors import OutputError
from zeroquant.files import cache_root, write_atomic
from zeroquant.progress import SILENT, Progress
from zeroquant.quant.gptq import hessian, round_layer, uses_gptq
from zeroquant.quant.sim import QuantSim, as_outputs

FORMAT = 2  # 2: GPTQ leaves poorly sampled layers to nearest rounding
MEMORY_BUDGET = 1 << 30  # bytes of kept activations per chunk of images


def cache_key(model_digest: str, images: torch.Tensor, choices, reduce_range: bool, rounding: str) -> str:
    """The images' hash stands for the calibration cache key (model, method, settings, seed) and is exact."""
    payload = json.dumps([FORMAT, model_digest, hashlib.sha256(images.numpy().tobytes()).hexdigest(), list(choices),
                          reduce_range, rounding])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cached_sensitivity(sim: QuantSim, images: torch.Tensor, choices, model_digest: str, reduce_range: bool,
                       use_cache: bool = True, progress: Progress = SILENT, workers: Workers = Workers(),
                       rounding: str = "nearest") -> tuple[np.ndarray, bool]:
    """layer_sensitivity from the cache (`<cache>/sensitivity/KEY.json`) when it was computed before; with several
    processes each measures its share of the layers and all get the whole table."""
    key = cache_key(model_digest, images, choices, reduce_range, rounding)
    path = cache_root() / "sensitivity" / f"{key}.json"
    cached = _load(path, list(sim.layers)) if use_cache else None
    if workers.agree(cached is not None):
        return cached, True
    rows = workers.share(len(sim.layers))
    measured = workers.gather(workers.run(lambda: layer_sensitivity(sim, images, choices, progress, rows, rounding)))
    table = np.stack([measured[row] for row in range(len(sim.layers))])
    if use_cache and workers.is_main:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"layers": list(sim.layers), "choices": list(choices),
                                           "kl": table.tolist()}).encode())
        except (OSError, OutputError):  # an unwritable cache only means measuring again next time
            pass
    return table, False


def _load(path, layers: list[str]) -> np.ndarray | None:
    try:
        data = json.loads(path.read_text())
        return np.array(data["kl"], dtype=float) if data["layers"] == layers else None
    except (OSError, ValueError, KeyError):  # absent, or a damaged entry: only a cache miss
        return None


def layer_sensitivity(sim: QuantSim, images: torch.Tensor, choices, progress: Progress = SILENT,
                      rows: list[int] | None = None, rounding: str = "nearest") -> dict[int, np.ndarray]:
    """{layer row: KL per choice}, averaged over the images, for the given rows (all by default), with each layer's
    weights rounded as quantize() will round them (nearest, or GPTQ's choice); leaves every quantizer of `sim`
    disabled."""
    sim.set_enabled(weights=False, activations=False)
    graph, k = sim.graph_module.graph, len(choices)
    batched = set().union(*(_downstream(graph, node) for node in graph.nodes if node.op == "placeholder"))
    nodes = {node.target: node for node in graph.nodes if node.op == "call_module" and node.target in sim.layers}
    names = list(sim.layers)
    rows = list(range(len(names))) if rows is None else rows
    table = {row: np.zeros(k) for row in rows}
    second_order = [bits for bits in choices if uses_gptq(rounding, bits)]
    decided = _gptq_choices(sim, images, second_order, [names[row] for row in rows], progress) if second_order \
        else {}
    keep = Interpreter(sim.graph_module, garbage_collect_values=False)
    with torch.no_grad():
        keep.run(images[:1])
        chunk = max(1, MEMORY_BUDGET // ((k + 1) * _bytes(keep.env)))
        with progress.stage("layer sensitivity", total=-(-len(images) // chunk) * len(rows) * k) as advance:
            for start in range(0, len(images), chunk):
                batch = images[start : start + chunk]
                reference = [F.log_softmax(out.double(), 1) for out in as_outputs(keep.run(batch))]
                for row in rows:
                    suffix = _Suffix(sim, nodes[names[row]], choices, len(batch), decided.get(names[row], {}))
                    env = suffix.stacked_env(keep.env, batched)
                    for log_p, out in zip(reference, as_outputs(suffix.run(batch, initial_env=env))):
                        log_q = F.log_softmax(out.double(), 1).unflatten(0, (k, len(batch)))
                        table[row] += image_kl(log_q, log_p.expand_as(log_q), class_dim=2).sum(1).numpy()
                    advance(k)
    return {row: values / len(images) for row, values in table.items()}


def _gptq_choices(sim: QuantSim, images: torch.Tensor, choices, names: list[str], progress: Progress) -> dict:
    """{layer: {bits: (step sizes, round_from)}}: GPTQ's rounding of each layer alone at each bit-width, from the
    Hessian of its float inputs."""
    decided = {}
    with progress.stage("second-order rounding per layer and bit-width", total=len(names)) as advance:
        for name in names:
            layer, original = sim.layers[name], sim.layers[name].bits
            inputs = hessian(sim, layer, images)
            decided[name] = {}
            for bits in choices:
                layer.set_bits(bits)
                round_layer(layer, inputs)
                decided[name][bits] = (layer.weight_scale.clone(), layer.round_from)
            layer.set_bits(original)
            advance()
    return decided


class _Suffix(Interpreter):
    """Runs only the nodes downstream of one layer, for every bit-width at once: the layer's outputs at each width
    are stacked along the batch, and the float values that the downstream nodes read are repeated to match."""

    def __init__(self, sim: QuantSim, node: torch.fx.Node, choices, n: int, decided: dict):
        super().__init__(sim.graph_module)
        self.node, self.layer, self.choices, self.n = node, sim.layers[node.target], choices, n
        self.decided = decided  # bits -> (step sizes, round_from) where a rounding method chose them
        self.downstream = _downstream(sim.graph_module.graph, node)

    def stacked_env(self, env: dict, batched: set) -> dict:
        """Upstream values; batch-dependent non-tensors (sizes, tuples) are left out, so they are recomputed."""
        dropped = {node for node in batched - self.downstream if not isinstance(env[node], torch.Tensor)}
        compute = self.downstream | dropped
        needed = {arg for node in compute for arg in node.all_input_nodes} - compute
        k = len(self.choices)
        return {node: value.repeat(k, *[1] * (value.dim() - 1)) if node in needed and node in batched else value
                for node, value in env.items() if node not in compute}

    def call_module(self, target, args, kwargs):
        if target != self.node.target:
            return super().call_module(target, args, kwargs)
        x, original = args[0][: self.n], self.layer.bits
        self.layer.enabled = True
        try:
            outputs = []
            for bits in self.choices:
                self.layer.set_bits(bits)
                if bits in self.decided:
                    scale, self.layer.round_from = self.decided[bits]
                    self.layer.set_weight_scale(scale)
                outputs.append(self.layer(x))
        finally:
            self.layer.enabled = False
            self.layer.set_bits(original)
        return torch.cat(outputs)


def image_kl(log_q: torch.Tensor, log_p: torch.Tensor, class_dim: int = 1) -> torch.Tensor:
    """KL(p || q) over the class dimension, averaged over positions for dense outputs (a segmentation map):
    [*leading, classes, *positions] -> [*leading]."""
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(class_dim)
    return kl.flatten(class_dim).mean(-1) if kl.dim() > class_dim else kl


def output_divergence(sim: QuantSim, images: torch.Tensor, reference) -> tuple[float, float]:
    """(mean KL from the reference outputs, summed over outputs; top-1 agreement in %, averaged over outputs and
    positions) of the simulation as it is configured."""
    with torch.no_grad():
        outputs = as_outputs(sim(images))
    kl, agreement = 0.0, []
    for expected, out in zip(as_outputs(reference), outputs):
        kl += image_kl(F.log_softmax(out.double(), 1), F.log_softmax(expected.double(), 1)).mean().item()
        agreement.append((out.argmax(1) == expected.argmax(1)).double().mean().item())
    return kl, 100.0 * sum(agreement) / len(agreement)


def _downstream(graph: torch.fx.Graph, start: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes whose value depends on `start` (graph.nodes is in topological order)."""
    dirty = {start}
    for node in graph.nodes:
        if any(arg in dirty for arg in node.all_input_nodes):
            dirty.add(node)
    return dirty


def _bytes(env: dict) -> int:
    tensors = {id(v): v for v in env.values() if isinstance(v, torch.Tensor)}
    return max(1, sum(t.numel() * t.element_size() for t in tensors.values()))
