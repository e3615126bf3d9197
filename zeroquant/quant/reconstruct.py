"""Block reconstruction (BRECQ-style) for low bit-widths: per block, learn weight rounding (AdaRound, annealed
regulariser) jointly with weight and activation step sizes (LSQ), with QDrop, so the quantized block reproduces
the float block's output on the distilled images. Blocks come from the graph: the stretches between two points
where only one tensor is alive (residual joins, or single layers in a plain chain), not from module class names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zeroquant.distributed import Workers
from zeroquant.graph.ops import relu_upper_bound
from zeroquant.progress import SILENT, Progress
from zeroquant.quant.quantizers import ActivationQuantizer, QuantizedLayer
from zeroquant.quant.sim import QuantSim, as_outputs, clamp_quantizers


@dataclass(frozen=True)
class Effort:
    iterations: int  # optimisation steps per block
    batch_size: int


EFFORTS = {"fast": Effort(100, 16), "default": Effort(400, 16), "thorough": Effort(1500, 32)}
ROUNDING_WEIGHT = 0.01  # lambda of AdaRound's rounding regulariser
WARMUP = 0.2  # fraction of steps before the regulariser starts (pure reconstruction first)
DROP_PROB = 0.5  # QDrop
ROUNDING_LR, SCALE_LR = 1e-2, 4e-4  # Adam; higher than BRECQ's 1e-3 / 4e-5, which assume 20k steps per block


@dataclass
class Block:
    graph_module: torch.fx.GraphModule  # one input, one output; shares its modules with the simulation
    layers: list[str]
    quantizers: list[str]  # activation quantizers first used in this block (their step sizes are learned here)


def find_blocks(sim: QuantSim) -> list[Block]:
    """Cut the simulation's graph wherever exactly one tensor is alive; each stretch with a layer is a block."""
    graph = sim.graph_module.graph
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    order = {node: i for i, node in enumerate(nodes)}
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    blocks, start_value, segment, seen_quantizers = [], placeholder, [], set()
    for i, node in enumerate(nodes):
        segment.append(node)
        alive = [n for n in [placeholder, *nodes[: i + 1]] if _used_after(n, order, i)]
        if alive == [node] and _has_layer(sim, segment):  # a segment without a layer joins the next block
            blocks.append(_extract(sim, start_value, segment, [node], seen_quantizers))
            start_value, segment = node, []
    if _has_layer(sim, segment):  # several outputs (a dict of maps): the last block ends at all of them
        output = next(n for n in graph.nodes if n.op == "output")
        ends = [n for n in as_outputs(output.args[0]) if isinstance(n, torch.fx.Node)]
        blocks.append(_extract(sim, start_value, segment, ends, seen_quantizers))
    return blocks


def _has_layer(sim: QuantSim, segment: list) -> bool:
    return any(n.op == "call_module" and n.target in sim.layers for n in segment)


def _used_after(node, order, index) -> bool:
    return any(order.get(u, math.inf) > index for u in node.users)


def _extract(sim: QuantSim, start, segment, ends: list, seen_quantizers: set) -> Block:
    """The segment as a module of one input and one output (several ends are flattened and concatenated, which is
    all the reconstruction loss needs)."""
    graph = torch.fx.Graph()
    value = {start: graph.placeholder("x")}

    def lookup(node):
        if node not in value:  # a parameter read (get_attr) of an op left in float
            value[node] = graph.node_copy(node)
        return value[node]

    for node in segment:
        value[node] = graph.node_copy(node, lookup)
    if len(ends) == 1:
        graph.output(value[ends[0]])
    else:
        flat = [graph.call_function(torch.flatten, (value[end], 1)) for end in ends]
        graph.output(graph.call_function(torch.cat, (flat, 1)))
    module = torch.fx.GraphModule(sim.graph_module, graph)
    layers = [n.target for n in segment if n.op == "call_module" and n.target in sim.layers]
    quantizers = []
    for n in segment:
        if n.op == "call_module" and n.target in sim.activations and n.target not in seen_quantizers:
            seen_quantizers.add(n.target)
            quantizers.append(n.target)
    return Block(module, layers, quantizers)


def _run(module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def _set_block_quantization(sim: QuantSim, block: Block, enabled: bool) -> None:
    for name in block.layers:
        sim.layers[name].enabled = enabled
    for node in block.graph_module.graph.nodes:
        if node.op == "call_module" and node.target in sim.activations:
            sim.activations[node.target].enabled = enabled


def reconstruct(sim: QuantSim, images: torch.Tensor, effort: str = "default", seed: int = 0,
                progress: Progress = SILENT, skip_layers: set[str] = frozenset(),
                workers: Workers = Workers()) -> list[dict]:
    """Reconstruct every block in order; returns per block the output MSE before and after, on the images it was
    trained on and on the held-out ones (for the report).

    The last HELD_OUT share of the images is not trained on: a block keeps its learned rounding and step sizes only
    if they lower the MSE on those images too, so a block that overfits the few distilled images goes back to what
    calibration and rounding gave it (Lite0 mixed 5-bit lost 2.2 points to reconstruction without this guard)."""
    settings = EFFORTS[effort]
    generator = torch.Generator().manual_seed(seed)
    blocks = find_blocks(sim)
    fp_in = q_in = images
    summary = []
    with progress.stage("block reconstruction", total=len(blocks) * settings.iterations) as advance:
        for block in blocks:
            row, fp_in, q_in = _reconstruct_block(sim, block, fp_in, q_in, settings, generator, skip_layers, advance,
                                                  workers)
            summary.append(row)
    _cap_to_clamps(sim)
    for name, layer in sim.layers.items():  # step sizes moved: biases follow their inputs' new scales
        feeding = sim.layer_inputs.get(name)
        layer.input_scale = sim.activations[feeding].grid()[0] if feeding else None
        layer.refresh_bias()
    return summary


def _reconstruct_block(sim, block, fp_in, q_in, settings, generator, skip_layers, advance, workers):
    """Train one block on the training images; keep the result if the held-out images agree; returns its report row
    and the block's float and quantized outputs (the next block's inputs)."""
    _set_block_quantization(sim, block, False)
    fp_out = _run(block.graph_module, fp_in, settings.batch_size)
    _set_block_quantization(sim, block, True)
    q_out = _run(block.graph_module, q_in, settings.batch_size)
    train = held_out_split(len(fp_in))
    saved = _snapshot(sim, block)
    _train_block(sim, block, fp_in[train], q_in[train], fp_out[train], settings, generator, skip_layers, advance,
                 workers)
    trained = _run(block.graph_module, q_in, settings.batch_size)
    held = torch.ones(len(fp_in), dtype=torch.bool)
    held[train] = False
    mse = {name: (float(torch.mean((q_out[rows] - fp_out[rows]) ** 2)),
                  float(torch.mean((trained[rows] - fp_out[rows]) ** 2)))
           for name, rows in (("", train), ("held_out_", held)) if len(q_out[rows])}
    kept = all(after <= before for before, after in mse.values())
    if kept:
        q_out = trained
    else:  # never leave a block worse than calibration left it (8-bit blocks have nothing to gain; some overfit)
        _restore(sim, block, saved)
    row = {"layers": [sim.layers[n].name for n in block.layers], "kept": kept}
    for prefix, (before, after) in mse.items():
        row |= {f"{prefix}mse_before": before, f"{prefix}mse_after": after if kept else before}
    return row, fp_out, q_out


HELD_OUT = 0.25  # share of the images a reconstruction keeps aside to decide whether a block keeps what it learned


def held_out_split(count: int) -> torch.Tensor:
    """Indices of the images trained on: all but the last quarter (at least one held out when there are two)."""
    held = min(count - 1, max(1, round(count * HELD_OUT))) if count > 1 else 0
    return torch.arange(count - held)


def _cap_to_clamps(sim: QuantSim) -> None:
    """A learned grid after a ReLU6 may outgrow 6, where no value lies; shrink it back to end at the clamp. That only
    refines the grid, and it keeps the exported ReLU6 absorbed into the quantizer: a float Clip left between Conv and
    QuantizeLinear would stop onnxruntime's QLinearConv fusion (measured: 37 % of Lite0's MACs fell back to float)."""
    for clamp, quantizer in clamp_quantizers(sim.graph_module.graph, sim.activations):
        upper = relu_upper_bound(clamp)
        if quantizer.zero_point == 0 and quantizer.range[1] > upper:
            quantizer.scale = upper / (2**quantizer.bits - 1)


def _snapshot(sim: QuantSim, block: Block) -> dict:
    return {"layers": {n: (sim.layers[n].round_from, sim.layers[n].weight_scale.clone()) for n in block.layers},
            "quantizers": {n: sim.activations[n].scale for n in block.quantizers}}


def _restore(sim: QuantSim, block: Block, saved: dict) -> None:
    for name, (round_from, scale) in saved["layers"].items():
        sim.layers[name].round_from = round_from
        sim.layers[name].set_weight_scale(scale)
    for name, scale in saved["quantizers"].items():
        sim.activations[name].scale = scale


def _train_block(sim, block, fp_in, q_in, fp_out, settings: Effort, generator, skip_layers, advance,
                 workers: Workers):
    """Learn the block's rounding and step sizes. With several processes every one draws the same minibatch and
    works on its share of the images; their gradients are summed, so all take the same step."""
    layers: list[QuantizedLayer] = [sim.layers[n] for n in block.layers if n not in skip_layers]
    quantizers: list[ActivationQuantizer] = [sim.activations[n] for n in block.quantizers]
    rounding, weight_scales = [], []
    for layer in layers:
        alpha, scale = layer.start_rounding()
        rounding.append(alpha)
        weight_scales.append(scale)
    act_scales = [q.start_learning(DROP_PROB, generator) for q in quantizers]
    groups = [{"params": rounding, "lr": ROUNDING_LR}]
    if weight_scales or act_scales:
        groups.append({"params": weight_scales + act_scales, "lr": SCALE_LR})
    optimizer = torch.optim.Adam(groups) if rounding or act_scales else None
    for group in groups:  # gradients exist from the start, even where a process's share of a step is empty
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    count = len(fp_in)
    try:
        for step in range(settings.iterations):
            if optimizer is None:
                break
            index = torch.randint(0, count, (min(settings.batch_size, count),), generator=generator)
            mix = torch.rand(q_in[index].shape, generator=generator) < DROP_PROB
            mine = torch.tensor(workers.share(len(index)), dtype=torch.long)
            inputs = torch.where(mix, fp_in[index], q_in[index])[mine]  # QDrop on the block input too
            output = block.graph_module(inputs)
            loss = ((output - fp_out[index][mine]) ** 2).sum() / len(index)  # per image, summed over its values
            progress_fraction = step / settings.iterations
            if progress_fraction >= WARMUP and layers and workers.is_main:  # counted once over the processes
                beta = 20 + (2 - 20) * (progress_fraction - WARMUP) / (1 - WARMUP)  # anneal 20 -> 2
                loss = loss + ROUNDING_WEIGHT * sum(
                    (1 - (2 * layer.rounding_up() - 1).abs().pow(beta)).sum() for layer in layers)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            workers.all_sum([p.grad for group in groups for p in group["params"]])
            optimizer.step()
            advance()
    finally:
        for layer in layers:
            layer.stop_rounding()
        for quantizer in quantizers:
            quantizer.stop_learning()
        if optimizer is None:
            advance(settings.iterations)

