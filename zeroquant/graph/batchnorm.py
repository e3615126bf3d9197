"""BatchNorm nodes: their running statistics drive distillation; afterwards they are folded into the conv before."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from zeroquant.graph.ops import Role, aten, attribute_value, layer_name, register_parameter, role


@dataclass
class BatchNormStats:
    """Running statistics of one BN layer, i.e. what the layer's *input* looked like on the training data."""

    name: str
    mean: torch.Tensor
    std: torch.Tensor


def batchnorm_nodes(graph_module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in graph_module.graph.nodes if role(n) is Role.BATCHNORM]


def _bn_params(graph_module, node):
    """(weight, bias, running_mean, running_var, eps) of an aten.batch_norm node, with defaults for affine=False."""
    x, weight, bias, mean, var = node.args[:5]
    eps = float(node.args[7]) if len(node.args) > 7 else 1e-5
    mean, var = attribute_value(graph_module, mean), attribute_value(graph_module, var)
    weight = attribute_value(graph_module, weight)
    bias = attribute_value(graph_module, bias)
    weight = torch.ones_like(mean) if weight is None else weight
    bias = torch.zeros_like(mean) if bias is None else bias
    return weight, bias, mean, var, eps


def batchnorm_stats(graph_module: torch.fx.GraphModule) -> list[BatchNormStats]:
    stats = []
    for node in batchnorm_nodes(graph_module):
        _, _, mean, var, eps = _bn_params(graph_module, node)
        stats.append(BatchNormStats(layer_name(node), mean.float(), torch.sqrt(var.float() + eps)))
    return stats


def fold_batchnorm(graph_module: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """A copy with every BN that directly follows a conv/linear (its only user; for a linear, maybe through reshapes
    of its leading dimensions) folded into that layer's weights, a BN of an [N, C] tensor that only a linear reads
    (LeViT's heads: BN -> dropout -> Linear) folded into that linear's input columns, and every other BN of an image
    tensor (pre-activation BN, as in DenseNet: BN -> ReLU -> conv, after a concat) turned into the depthwise 1x1 conv
    it equals, which onnxruntime runs as an integer QLinearConv with the ReLU absorbed.

    Returns the new module and how many BN layers were not folded into a layer (before or after them).
    """
    gm = copy.deepcopy(graph_module)
    unfolded = 0
    for node in batchnorm_nodes(gm):
        producer = _folding_target(node)
        if producer is None and _fold_into_next_linear(gm, node):
            continue
        if producer is None:
            unfolded += 1
            _as_depthwise_conv(gm, node)
            continue
        gamma, beta, mean, var, eps = _bn_params(gm, node)
        scale = gamma / torch.sqrt(var + eps)
        weight_node = producer.args[1]
        bias_node = producer.args[2] if len(producer.args) > 2 else None
        weight = attribute_value(gm, weight_node)
        bias = attribute_value(gm, bias_node) if bias_node is not None else torch.zeros_like(mean)
        folded_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        folded_bias = (bias - mean) * scale + beta
        base = layer_name(producer).replace(".", "_")
        with gm.graph.inserting_before(producer):
            new_weight = register_parameter(gm, f"{base}_weight", folded_weight)
            new_bias = register_parameter(gm, f"{base}_bias", folded_bias)
        args = list(producer.args)
        args[1] = new_weight
        if len(args) > 2:
            args[2] = new_bias
        else:
            args.append(new_bias)
        producer.args = tuple(args)
        # the layer's output on the training data, per channel: mean beta, std |gamma| (ranges.ChannelGaussians)
        producer.meta["bn_output"] = (beta.detach().float().clone(), gamma.detach().abs().float().clone())
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, unfolded


MERGES = {aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _folding_target(node: torch.fx.Node) -> torch.fx.Node | None:
    """The conv/linear whose output channels this BN normalises, with no other reader: the op right before it, or a
    linear whose [..., C] output reaches a 2-D BN as [N, C] through reshapes that only merge leading dimensions
    (LeViT's BatchNorm1d over batch and tokens after each Linear)."""
    source = node.args[0]
    while isinstance(source, torch.fx.Node) and source.target in MERGES and _value_readers(source) == 1 and \
            _rank(node.args[0]) == 2 and _last_dim(source) == _last_dim(source.args[0]):
        source = source.args[0]
    if not (isinstance(source, torch.fx.Node) and role(source) is Role.WEIGHTED and _value_readers(source) == 1):
        return None
    if source is not node.args[0] and source.target != aten.linear.default:
        return None  # a conv's channels are not the last dimension: a reshape would mix them
    return source


def _fold_into_next_linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """W @ (x * s + t) + b = (W * s) @ x + (b + W @ t) for a BN on [N, C] whose only reader, through eval-mode
    dropouts, is a linear's input; True when folded. (Before a conv the zero padding would see the shift.)"""
    reader = node
    while len(reader.users) == 1 and next(iter(reader.users)).target in DROPOUTS:
        reader = next(iter(reader.users))
    linear = next(iter(reader.users)) if len(reader.users) == 1 else None
    if _rank(node) != 2 or linear is None or linear.target != aten.linear.default or linear.args[0] is not reader:
        return False
    gamma, beta, mean, var, eps = _bn_params(gm, node)
    scale = gamma / torch.sqrt(var + eps)
    weight = attribute_value(gm, linear.args[1])
    bias = attribute_value(gm, linear.args[2]) if len(linear.args) > 2 and linear.args[2] is not None else \
        torch.zeros(weight.shape[0])
    base = layer_name(linear).replace(".", "_")
    with gm.graph.inserting_before(linear):
        new_weight = register_parameter(gm, f"{base}_weight", weight * scale)
        new_bias = register_parameter(gm, f"{base}_bias", bias + weight @ (beta - mean * scale))
    linear.args = (linear.args[0], new_weight, new_bias)
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)
    return True


DROPOUTS = {aten.dropout.default, aten.dropout_.default, aten.alias.default, aten.clone.default}
SHAPE_OF_SECOND = {aten.reshape_as.default, aten.view_as.default, aten.expand_as.default}


def _value_readers(node: torch.fx.Node) -> int:
    """Users that read the node's values, not only its shape (x.reshape_as(node), node.size(0))."""
    return sum(1 for user in node.users if user.target is not aten.sym_size.int and
               not (user.target in SHAPE_OF_SECOND and user.args[0] is not node))


def _rank(node) -> int | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _last_dim(node) -> int | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.shape[-1] if isinstance(value, torch.Tensor) and value.dim() else None


def _as_depthwise_conv(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """BN(x) = x * gamma / std + (beta - mean * gamma / std) per channel: a depthwise 1x1 conv of an N,C,H,W tensor.
    Other ranks (BN after a flatten) stay as they are, in float."""
    value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return
    gamma, beta, mean, var, eps = _bn_params(gm, node)
    scale = gamma / torch.sqrt(var + eps)
    base = layer_name(node).replace(".", "_")
    with gm.graph.inserting_before(node):
        weight = register_parameter(gm, f"{base}_weight", scale.reshape(-1, 1, 1, 1))
        bias = register_parameter(gm, f"{base}_bias", beta - mean * scale)
        conv = gm.graph.call_function(torch.ops.aten.conv2d.default,
                                      (node.args[0], weight, bias, [1, 1], [0, 0], [1, 1], len(scale)))
    conv.meta = dict(node.meta)
    conv.meta["bn_output"] = (beta.detach().float().clone(), gamma.detach().abs().float().clone())
    node.replace_all_uses_with(conv)
    gm.graph.erase_node(node)


@dataclass
class InputStatistics:
    """Per-channel mean and std of the model's input on its training data, as the first conv + BN implies them."""

    mean: torch.Tensor
    std: torch.Tensor

    # Images with pixels in [0, 1] normalised by the dataset's mean (about 0.45) and std (about 0.225) span from
    # about 2.0 std below the mean to 2.44 above it: [(0 - 0.45) / 0.225, (1 - 0.45) / 0.225].
    BELOW, ABOVE = 2.0, 2.44

    def range(self) -> tuple[float, float]:
        """The input range these statistics imply for images, over all channels."""
        return float((self.mean - self.BELOW * self.std).min()), float((self.mean + self.ABOVE * self.std).max())


SPATIAL_CORRELATION = 0.95  # of neighbouring pixels in natural images, for the variance the first BN implies
CHANNEL_CORRELATION = 0.9  # between the colour channels of a pixel


def input_statistics(graph_module: torch.fx.GraphModule) -> InputStatistics | None:
    """Solve for the input's per-channel mean and its std from the BN right after the first conv (the one that reads
    the input, through a zero pad if need be). Its running mean is the conv applied to the input's mean: least
    squares over the output channels. Its running variance is the conv's weights against the input's covariance,
    modelled as one std for all channels times fixed correlations between neighbouring pixels and between colour
    channels of natural images: one unknown, fitted over the output channels (checked on the zoo models against
    their real images: EfficientNet-Lite0 std 0.55 against 0.50 real, ResNet-20 mean and std within 0.3).
    None where the model does not start with conv -> BN."""
    placeholder = next((n for n in graph_module.graph.nodes if n.op == "placeholder"), None)
    for node in batchnorm_nodes(graph_module):
        conv = node.args[0]
        if not (isinstance(conv, torch.fx.Node) and role(conv) is Role.WEIGHTED and _reads(conv, placeholder)):
            continue
        if conv.target != torch.ops.aten.conv2d.default or (len(conv.args) > 6 and conv.args[6] != 1):
            return None
        weight = attribute_value(graph_module, conv.args[1]).double()  # [out, in, kh, kw]
        bias = attribute_value(graph_module, conv.args[2]) if len(conv.args) > 2 else None
        _, _, mean, var, _ = _bn_params(graph_module, node)
        offset = mean.double() - (bias.double() if bias is not None else 0.0)
        input_mean = torch.linalg.lstsq(weight.sum((2, 3)), offset.unsqueeze(1)).solution.squeeze(1)
        rows, cols = torch.meshgrid(torch.arange(weight.shape[2]), torch.arange(weight.shape[3]), indexing="ij")
        positions = torch.stack([rows.flatten(), cols.flatten()], 1).double()
        spatial = SPATIAL_CORRELATION ** torch.cdist(positions, positions)
        channels = weight.shape[1]
        colour = torch.full((channels, channels), CHANNEL_CORRELATION, dtype=torch.double).fill_diagonal_(1.0)
        flat = weight.reshape(len(weight), channels, -1)
        gain = torch.einsum("oik,kl,ojl,ij->o", flat, spatial, flat, colour)  # Var[y_o] = std^2 * gain_o
        variance = float((gain * var.double()).sum() / (gain * gain).sum())
        if not variance > 0 or not bool(torch.isfinite(input_mean).all()):
            return None
        return InputStatistics(input_mean.float(), torch.full((channels,), variance ** 0.5))
    return None


def _reads(conv: torch.fx.Node, placeholder) -> bool:
    """Whether the conv reads the model's input, directly or through a zero pad."""
    source = conv.args[0]
    while isinstance(source, torch.fx.Node) and source.target in (torch.ops.aten.constant_pad_nd.default,
                                                                   torch.ops.aten.pad.default):
        source = source.args[0]
    return source is placeholder
