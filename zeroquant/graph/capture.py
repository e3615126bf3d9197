"""Capture any CNN as a torch.export graph, so every later pass works on aten ops, not on module class names."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import Dim

from zeroquant.errors import UnsupportedModelError, UsageError


@dataclass
class CapturedModel:
    graph_module: torch.fx.GraphModule
    input_shape: tuple[int, int, int]


def capture(module: torch.nn.Module, input_shape: tuple[int, int, int]) -> CapturedModel:
    """torch.export the model with a dynamic batch dimension and return its graph as a GraphModule."""
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise UsageError(f"input shape must be C,H,W with positive sizes, got {input_shape}")
    module = module.eval()
    example = torch.randn(2, *input_shape)
    try:
        with torch.no_grad():
            module(example)
    except Exception as exc:  # the model's own code rejects the shape: say so in one line
        if _accepts_one_image(module, input_shape):
            raise UnsupportedModelError(
                "the model runs only on a batch of 1 image (e.g. torch.export'ed with a fixed batch size)",
                "export it with an example batch of 2 and dynamic_shapes=({0: torch.export.Dim('batch')},)",
            ) from exc
        raise UnsupportedModelError(
            f"the model rejects input shape {','.join(map(str, input_shape))}: {_first_line(exc)}",
            "pass the right --input-shape C,H,W",
        ) from exc
    try:
        exported = torch.export.export(module, (example,), dynamic_shapes=({0: Dim("batch", min=1)},))
    except Exception as exc:
        raise UnsupportedModelError(f"torch.export cannot capture the model: {_first_line(exc)}") from exc
    graph_module = exported.module()
    _drop_guards(graph_module)
    _read_batch_size_locally(graph_module)
    return CapturedModel(graph_module, tuple(input_shape))


def _accepts_one_image(module: torch.nn.Module, input_shape: tuple[int, int, int]) -> bool:
    """Calibration and export run batches: tell a batch-size limit apart from a wrong input shape."""
    try:
        with torch.no_grad():
            module(torch.randn(1, *input_shape))
    except Exception:
        return False
    return True


def _drop_guards(graph_module: torch.fx.GraphModule) -> None:
    """torch.export adds a shape-guard call; later passes rebuild the graph, and onnx export would trace it."""
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.recompile()


def _read_batch_size_locally(graph_module: torch.fx.GraphModule) -> None:
    """torch.export reads the batch size once, from the input (`sym_size(x, 0)`), and keeps it until e.g. a final
    `view(batch, -1)`; that would keep the input alive through the whole graph, and blocks for reconstruction are cut
    where only one tensor is alive. Read it instead from the tensor its user reshapes (the same batch size)."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.target != torch.ops.aten.sym_size.int or node.args[1] != 0:
            continue
        for user in list(node.users):
            source = user.args[0] if user.args else None
            if not (isinstance(source, torch.fx.Node) and source is not node.args[0] and _batch_leading(source, node)):
                continue
            with graph.inserting_before(user):
                local = graph.call_function(torch.ops.aten.sym_size.int, (source, 0))
            local.meta = dict(node.meta)
            user.replace_input_with(node, local)
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    graph_module.recompile()


def _batch_leading(tensor_node: torch.fx.Node, size_node: torch.fx.Node) -> bool:
    value, size = tensor_node.meta.get("val"), size_node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() > 0 and str(value.shape[0]) == str(size)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
