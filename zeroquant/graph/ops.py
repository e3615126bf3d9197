"""What each aten op means to the quantizer: a registry from op to role, instead of if-chains in the passes.

Roles:
- WEIGHTED: conv/linear; weights quantized per channel, bias to int32 (onnxruntime's QLinearConv/QGemm).
- BATCHNORM: folded into the preceding WEIGHTED op when possible.
- ACTIVATION: relu / relu6 (hardtanh 0..6); fused into the WEIGHTED or add before it, as onnxruntime folds
  Relu/Clip into the following QuantizeLinear.
- PASSTHROUGH: ops that only move, select, split or interpolate values; their output reuses the input's quantizer
  (same scale and zero point), which onnxruntime needs to run them on uint8 data. A `getitem` reads one output of a
  split / chunk / unbind (the op itself yields a list, no tensor, and has no role).
- Anything else (add, pooling, mul, sigmoid, unknown ops): its output gets a quantizer of its own. onnxruntime runs
  it in an integer kernel where it has one; the census of its optimised graph (export/verify.py) names the rest.
"""

from __future__ import annotations

import functools
import operator
from enum import Enum

import torch

aten = torch.ops.aten


class Role(Enum):
    WEIGHTED = "weighted"
    BATCHNORM = "batchnorm"
    ACTIVATION = "activation"
    PASSTHROUGH = "passthrough"
    COMPUTE = "compute"


ROLES: dict[object, Role] = {
    aten.conv2d.default: Role.WEIGHTED,
    aten.linear.default: Role.WEIGHTED,
    aten.batch_norm.default: Role.BATCHNORM,
    aten.relu.default: Role.ACTIVATION,
    aten.relu_.default: Role.ACTIVATION,
    aten.hardtanh.default: Role.ACTIVATION,
    aten.hardtanh_.default: Role.ACTIVATION,
    aten.relu6.default: Role.ACTIVATION,
}
for _op in (
    aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten.slice.Tensor, aten.pad.default,
    aten.constant_pad_nd.default, aten.max_pool2d.default, aten.dropout.default, aten.alias.default,
    aten.clone.default, aten.contiguous.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
    aten.permute.default, aten.transpose.int, aten.detach.default, aten.dropout_.default, operator.getitem,
    aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default, aten.upsample_bilinear2d.vec,
    aten.upsample_bilinear2d.default, aten.expand.default, aten.pixel_shuffle.default, aten.pixel_unshuffle.default,
    aten.channel_shuffle.default,
):
    ROLES[_op] = Role.PASSTHROUGH

SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
          aten.tensor_split.sections, aten.tensor_split.indices}



def role(node: torch.fx.Node) -> Role | None:
    """The role of a call_function node; None for nodes that carry no float tensor (shapes, guards, constants)."""
    if node.op != "call_function" or not is_float_tensor(node):
        return None
    return ROLES.get(node.target, Role.COMPUTE)


def is_float_tensor(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def is_relu_like(node: torch.fx.Node) -> bool:
    """relu, or a hardtanh/relu6 clamping at 0 from below: both vanish into a uint8 zero point of 0."""
    if ROLES.get(node.target) is not Role.ACTIVATION:
        return False
    if node.target in (aten.hardtanh.default, aten.hardtanh_.default):
        return float(node.args[1] if len(node.args) > 1 else -1.0) == 0.0
    return True


def relu_upper_bound(node: torch.fx.Node) -> float:
    """The top of a relu-like op's output: inf for relu, 6 for relu6, max_val (default 1) for hardtanh."""
    if node.target in (aten.hardtanh.default, aten.hardtanh_.default):
        return float(node.args[2]) if len(node.args) > 2 else 1.0
    return 6.0 if node.target == aten.relu6.default else float("inf")


def passthrough_source(node: torch.fx.Node):
    """The tensor a PASSTHROUGH op reads its values from: its first argument, or, for a getitem of a split, the
    split's input."""
    source = node.args[0] if node.args else None
    if node.target is operator.getitem and isinstance(source, torch.fx.Node) and source.target in SPLITS:
        source = source.args[0]
    return source


def attribute_value(graph_module: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a get_attr node reads (None for an absent optional argument, such as a conv without bias)."""
    if node is None:
        return None
    if node.op != "get_attr":
        raise ValueError(f"expected a parameter, got node {node}")
    return functools.reduce(getattr, node.target.split("."), graph_module).detach()


def layer_name(node: torch.fx.Node) -> str:
    """The module path a node came from (e.g. 'layer1.0.conv1'), falling back to the node name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return path
    return node.name


def free_attribute(gm: torch.nn.Module, name: str) -> str:
    """`name`, or `name_1`, `name_2`, ...: the first the module has no attribute of."""
    attr, suffix = name, 1
    while hasattr(gm, attr):
        attr, suffix = f"{name}_{suffix}", suffix + 1
    return attr


def register_parameter(gm: torch.fx.GraphModule, name: str, value: torch.Tensor) -> torch.fx.Node:
    """Store a tensor as a new top-level parameter of the graph module and return a get_attr node for it."""
    attr = free_attribute(gm, name)
    gm.register_parameter(attr, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    return gm.graph.get_attr(attr)


def uint8_step(values: torch.Tensor) -> float | None:
    """The coarsest step 1 / m of a uint8 grid (zero point 0) holding every one of these non-negative values exactly;
    None where none does."""
    if values.numel() == 0 or not values.is_floating_point() or bool((values < 0).any()):
        return None
    values, top = values.double(), float(values.max())
    for m in range(1, 256):
        if top * m > 255 + 1e-6:
            return None
        if bool(((values * m).round() / m - values).abs().le(1e-6 * values).all()):  # relative: 1e-5 is not 0
            return 1.0 / m
    return None


def pair(value) -> tuple[int, int]:
    """A conv or pool argument (an int, or a list of one or two) as (height, width)."""
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return values[0], values[-1]


COMMUTATIVE = {aten.add.Tensor, aten.add_.Tensor, aten.mul.Tensor, aten.mul_.Tensor}


def constant_value(graph_module: torch.fx.GraphModule, arg) -> float | torch.Tensor | None:
    """An elementwise op's constant operand: a Python number as a float, a parameter read (get_attr) as its tensor;
    None for anything else (a computed tensor, a bool)."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return attribute_value(graph_module, arg)
    return None

