"""The distillation engine every BN-matching method shares: BatchNorm taps that measure how far a batch's statistics
are from the running statistics (ZeroQ's loss), the exact gradient of that loss with respect to the images, computed
in micro-batches when memory asks for it, and the loop over independently seeded batches."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zeroquant.calib.calibset import Batch, DistillSettings, batch_generator
from zeroquant.graph.batchnorm import batchnorm_nodes
from zeroquant.graph.ops import attribute_value, layer_name
from zeroquant.progress import Progress

MEMORY_BUDGET = 2 << 30  # bytes of activations kept for the backward pass of one distillation step
OutputLoss = Callable[[torch.Tensor, slice], torch.Tensor]  # (outputs of some rows of a batch, those rows) -> loss


class BatchNormTap(nn.Module):
    """Stands in for one BN layer: applies it (eval mode) and measures how far the batch statistics of its input are
    from the layer's running statistics (ZeroQ's loss: L2 distance of the means plus that of the std devs).

    Modes: "apply" only applies the layer; "loss" keeps the loss with its autograd graph (the whole batch in one
    pass); "sums" adds the input's per-channel sum and sum of squares (no grad: the first pass over micro-batches);
    "surrogate" adds <g1, sum x> + <g2, sum x^2>, whose gradient is this micro-batch's exact share of the loss
    gradient (the second pass)."""

    def __init__(self, name, weight, bias, mean, var, eps):
        super().__init__()
        self.name, self.eps, self.mode = name, eps, "loss"
        self.emphasis = 1.0  # this layer's weight in the gradient (the loss reported stays unweighted, comparable)
        for attr, value in dict(weight=weight, bias=bias, mean=mean, var=var).items():
            self.register_buffer(attr, None if value is None else value.detach().clone())
        self.value: torch.Tensor | float = 0.0  # the loss ("loss") or the surrogate ("surrogate")
        self.sums: list = []
        self.coefficients: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(x.dim()) if d != 1]
        if self.mode == "loss":
            batch_std = torch.sqrt(x.var(dims, unbiased=False) + self.eps)
            self.value = self.loss(x.mean(dims), batch_std)
        elif self.mode == "sums":
            wide = x.detach().double()
            self.sums.append((wide.sum(dims), wide.square().sum(dims), x.numel() // x.shape[1]))
        elif self.mode == "surrogate":
            g1, g2 = self.coefficients
            self.value = self.value + (g1 * x.sum(dims)).sum() + (g2 * x.square().sum(dims)).sum()
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps)

    def loss(self, batch_mean: torch.Tensor, batch_std: torch.Tensor) -> torch.Tensor:
        return torch.norm(batch_mean - self.mean) + torch.norm(batch_std - torch.sqrt(self.var + self.eps))

    def finish_sums(self) -> float:
        """The loss of the batch whose sums were collected, and the coefficients of the surrogate."""
        s1 = sum(s[0] for s in self.sums)
        s2 = sum(s[1] for s in self.sums)
        n = sum(s[2] for s in self.sums)
        self.sums = []
        mean = (s1 / n).requires_grad_(True)
        var = (s2 / n - mean.detach().square()).clamp_min(0).requires_grad_(True)
        loss = self.loss(mean, torch.sqrt(var + self.eps))
        d_mean, d_var = torch.autograd.grad(self.emphasis * loss, (mean, var))
        # L(S1, S2) with mean = S1/n, var = S2/n - mean^2: the chain rule through the sums
        self.coefficients = ((d_mean - 2 * mean.detach() * d_var) / n).float(), (d_var / n).float()
        return float(loss.detach())


def tap_batchnorms(graph_module: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[BatchNormTap]]:
    """A copy of the graph whose BN nodes are BatchNormTaps, and the taps in graph order."""
    gm = copy.deepcopy(graph_module)
    taps = []

    def attr(node):
        return attribute_value(gm, node)

    for index, node in enumerate(batchnorm_nodes(gm)):
        x, weight, bias, mean, var = node.args[:5]
        eps = float(node.args[7]) if len(node.args) > 7 else 1e-5
        name = f"bn_tap_{index}"
        tap = BatchNormTap(layer_name(node), attr(weight), attr(bias), attr(mean), attr(var), eps)
        gm.add_submodule(name, tap)
        taps.append(tap)
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(name, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm, taps


@dataclass
class Step:
    """One evaluation of the BN loss on a batch: the total, per BN layer, and its gradient w.r.t. the images."""

    loss: float
    layers: dict[str, float]
    grad: torch.Tensor


class BatchNormMatcher:
    """The tapped copy of a BN network on a device; `step(images)` gives the ZeroQ loss and its exact gradient.

    Peak memory is what the backward pass keeps, which grows with batch x resolution. When a batch would keep more
    than MEMORY_BUDGET bytes, it runs in micro-batches: a first pass without gradients collects every BN input's
    sums over the whole batch (so the loss is the whole batch's), a second pass per micro-batch backpropagates the
    exact share of the gradient. About a third more compute, memory of one micro-batch.

    `precision` "bfloat16" runs the network's passes under autocast: convolutions and activations in bfloat16 (torch
    reduces them to the BN statistics with float accumulation), the loss, its gradient and the images' update in
    float32. On a CPU with AMX, EfficientNet-Lite0's step at batch 32 x 224 px took 2.3 instead of 3.6-4.7 s (half
    the kept activations: one pass instead of two micro-batches), but the gradient points 5 % off float32's (cosine
    0.945, mostly through the deep BN layers: the rounded weights and activations are a slightly different network;
    summing the statistics into float32 changed nothing), so it is opt-in."""

    def __init__(self, graph_module: torch.fx.GraphModule, input_shape, device: torch.device,
                 memory_budget: int = MEMORY_BUDGET, precision: str = "float32"):
        self.model, self.taps = tap_batchnorms(graph_module)
        self.model = self.model.to(device)
        self.device = device
        self.precision = precision
        self.micro_batch = max(1, int(memory_budget // self.bytes_per_image(input_shape)))

    def _arithmetic(self):
        """The context the network's passes run in: bfloat16 autocast or plain float32."""
        if self.precision == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def prior_loss(images: torch.Tensor) -> torch.Tensor:
        """Pull the images' per-channel mean and std towards 0 and 1, the statistics of normalised inputs.

        Measured against a prior at the statistics the first conv + BN imply (graph.batchnorm.input_statistics,
        std 0.54 for EfficientNet-Lite0, whose real images have 0.50 where these end at 1.5): those images were
        worse calibration data for Lite0 (W8A8 agreement 97.8 against 98.6 %, W4A8 with GPTQ 74.6 against 79.2 %
        top-1) and no better for ResNet-20, so the prior stays at 0 and 1."""
        dims = [0, 2, 3]
        return torch.norm(images.mean(dims)) + torch.norm(images.std(dims) - 1)

    def bytes_per_image(self, input_shape) -> int:
        """What one more image adds to what the loss keeps for the backward pass (autograd's saved tensors)."""

        def kept(batch: int) -> int:
            sizes = {}  # by storage: a tensor saved by two ops (a BN input, also its variance's) is kept once

            def pack(tensor):
                sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
                return tensor

            x = torch.zeros(batch, *input_shape, device=self.device, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), self._arithmetic():
                self._set_mode("loss")
                self.model(x)
            return sum(sizes.values())

        return max(1, kept(2) - kept(1))

    def _set_mode(self, mode: str) -> None:
        for tap in self.taps:
            tap.mode, tap.value = mode, 0.0

    def step(self, images: torch.Tensor, output_loss: OutputLoss | None = None) -> Step:
        """The BN loss of the batch, plus `output_loss(outputs, rows)` when given (a loss on the network's outputs
        for those rows of the batch, already divided by the batch size, so micro-batches add up to the whole), and
        the gradient of their sum w.r.t. the images."""
        def extra(output, rows: slice) -> torch.Tensor | float:
            return output_loss(output, rows) if output_loss is not None else 0.0

        if len(images) <= self.micro_batch:
            x = images.detach().requires_grad_(True)
            self._set_mode("loss")
            with self._arithmetic():
                output = self.model(x)
            bn = sum(tap.value for tap in self.taps)
            total = sum(tap.emphasis * tap.value for tap in self.taps) + extra(output, slice(0, len(x)))
            (grad,) = torch.autograd.grad(total, x)
            return Step(float(bn.detach()), {tap.name: float(tap.value.detach()) for tap in self.taps}, grad)
        self._set_mode("sums")
        with torch.no_grad(), self._arithmetic():
            for chunk in images.split(self.micro_batch):
                self.model(chunk)
        layers = {tap.name: tap.finish_sums() for tap in self.taps}
        grads = []
        for start, chunk in zip(range(0, len(images), self.micro_batch), images.split(self.micro_batch)):
            x = chunk.detach().requires_grad_(True)
            self._set_mode("surrogate")
            with self._arithmetic():
                output = self.model(x)
            total = sum(tap.value for tap in self.taps) + extra(output, slice(start, start + len(x)))
            grads.append(torch.autograd.grad(total, x)[0])
        return Step(sum(layers.values()), layers, torch.cat(grads))

    def outputs(self, images: torch.Tensor):
        """The network's outputs, without gradient or BN bookkeeping."""
        self._set_mode("apply")
        with torch.no_grad():
            return self.model(images)

    def measure(self, images: torch.Tensor) -> tuple[float, dict[str, float]]:
        """The loss of a batch without its gradient (one pass of sums, micro-batched like `step`), in float32
        whatever the precision of the steps, so final losses compare across precisions."""
        self._set_mode("sums")
        with torch.no_grad():
            for chunk in images.split(self.micro_batch):
                self.model(chunk)
        layers = {tap.name: tap.finish_sums() for tap in self.taps}
        return sum(layers.values()), layers


BatchFn = Callable[[int, torch.Generator, Callable], torch.Tensor]


def distill_batches(label: str, matcher: BatchNormMatcher, settings: DistillSettings, distill_batch: BatchFn,
                    progress: Progress, indices: list[int]) -> dict[int, Batch]:
    """Run `distill_batch(size, generator, advance)` for each batch index, each with its own seeded generator, and
    measure the final loss of its images."""
    sizes, batches = settings.batch_sizes(), {}
    with progress.stage(f"{label} distillation", total=len(indices) * settings.iterations) as advance:
        for index in indices:
            images = distill_batch(sizes[index], batch_generator(settings.seed, index), advance).detach()
            loss, layers = matcher.measure(images)
            batches[index] = Batch(images.cpu(), loss + float(matcher.prior_loss(images)), layers)
    return batches
