"""Capture any CNN as a torch.export graph, so every later pass works on aten ops, not on module class names."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import operator
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from zeroquant.errors import UnsupportedModelError, UsageError, first_line
from zeroquant.graph.constants import fold_parameter_ops

aten = torch.ops.aten
ASSERTIONS = {aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
              aten.sym_constrain_range.default, aten._assert_tensor_metadata.default}


SIZE_ARGUMENT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


@dataclass
class CapturedModel:
    graph_module: torch.fx.GraphModule  # returns the model's output tensor, or a tuple of them (one per name)
    input_shape: tuple[int, int, int]
    output_names: list[str]  # "logits" for a single tensor; else the keys of the model's outputs ("out", "aux")
    digest: str  # what is distilled from, as a cache key: the graph's code, its tensors and zeroquant's version


def capture(module: torch.nn.Module, input_shape: tuple[int, int, int]) -> CapturedModel:
    """torch.export the model with a dynamic batch dimension and return its graph as a GraphModule whose outputs
    are flat (a tensor, or a tuple of tensors named by `output_names`)."""
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise UsageError(f"input shape must be C,H,W with positive sizes, got {input_shape}")
    if isinstance(module, torch.fx.GraphModule):
        module = free_batch(module)
    with evaluating(module):
        exported = _export(module, input_shape)
    graph_module = exported.module()
    _drop_guards(graph_module)
    _inline_autocast_off(graph_module)
    fold_parameter_ops(graph_module)
    _read_batch_size_locally(graph_module)
    return CapturedModel(graph_module, tuple(input_shape), _flat_outputs(graph_module, exported.call_spec.out_spec),
                         graph_digest(graph_module))


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """The module in eval mode for the block, and every submodule's train/eval mode as the caller had it after."""
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for sub, training in modes.items():
            sub.training = training


def graph_digest(graph_module: torch.fx.GraphModule) -> str:
    """A key for caches of what is computed from the model: two modules with the same weights but another forward
    differ in their code; a new zeroquant (a fixed distiller) differs in its version."""
    import zeroquant

    digest = hashlib.sha256(f"{zeroquant.__version__}\n{graph_module.code}".encode())
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(graph_module)
            if isinstance(value, torch.Tensor):
                digest.update(f"{node.target}:{value.dtype}:{tuple(value.shape)}".encode())
                digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _export(module: torch.nn.Module, input_shape: tuple[int, int, int]) -> torch.export.ExportedProgram:
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))  # not the caller's RNG
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
            f"the model rejects input shape {','.join(map(str, input_shape))}: {first_line(exc)}",
            "pass the right --input-shape C,H,W",
        ) from exc
    try:
        return torch.export.export(module, (example,), dynamic_shapes=({0: Dim("batch", min=1)},))
    except Exception as exc:
        raise UnsupportedModelError(f"torch.export cannot capture the model: {first_line(exc)}") from exc


def _flat_outputs(graph_module: torch.fx.GraphModule, out_spec) -> list[str]:
    """Make the graph return its leaves (a tensor, or a tuple) instead of the model's dict / nested structure, and
    name each leaf by its key path: a dict's keys ("out", "aux"), positions for a tuple ("output_0", ...)."""
    leaves = out_spec.num_leaves
    paths = [path for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(range(leaves), out_spec))[0]]
    names = [".".join(_key_name(k) for k in path) for path in paths]
    names = ["logits"] if leaves == 1 else [n if not n.isdigit() else f"output_{n}" for n in names]
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    values = pytree.tree_leaves(output.args[0])
    output.args = (values[0] if leaves == 1 else tuple(values),)
    graph_module.graph._codegen = torch.fx.graph.CodeGen()
    graph_module.recompile()
    return names


def _key_name(key) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def free_batch(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a torch.export'ed module that runs on any batch size: a program saved with a bounded batch
    (Dim('batch', min=1, max=1024)) checks its inputs against that range, and one saved with a fixed batch B has B
    written into its reshapes. The checks go; a leading B in a reshape of a tensor whose batch is B becomes that
    tensor's own batch size. Anything else is left as it is (capture then says what the model rejects)."""
    module = copy.deepcopy(module)
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" or node.target in ASSERTIONS:
            graph.erase_node(node)
    placeholder = next((n for n in graph.nodes if n.op == "placeholder"), None)
    batch = _static_batch(placeholder)
    if batch is not None:
        for node in list(graph.nodes):
            if node.target not in SIZE_ARGUMENT_OPS or not isinstance(node.args[1], (list, tuple)):
                continue
            source, sizes = node.args[0], list(node.args[1])
            if sizes and sizes[0] == batch and _static_batch(source) == batch:
                with graph.inserting_before(node):
                    sizes[0] = graph.call_function(aten.sym_size.int, (source, 0))
                node.args = (source, sizes, *node.args[2:])
    graph.eliminate_dead_code()
    module.recompile()
    return module


def _static_batch(node) -> int | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(value, torch.Tensor) and value.dim() > 0 and isinstance(value.shape[0], int):
        return value.shape[0]
    return None


def _accepts_one_image(module: torch.nn.Module, input_shape: tuple[int, int, int]) -> bool:
    """Calibration and export run batches: tell a batch-size limit apart from a wrong input shape."""
    try:
        with torch.no_grad():
            module(torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0)))
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


def _inline_autocast_off(graph_module: torch.fx.GraphModule) -> None:
    """torch.export writes a `torch.autocast(enabled=False)` region (EfficientViT's attention) as a higher-order op
    calling a subgraph, which no later pass looks into: its products stayed float. With autocast off it computes
    what its ops compute, so they are copied into the graph in its place."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.higher_order.wrap_with_autocast or node.args[2]:
            continue  # an enabled region changes dtypes: kept as it is
        subgraph = operator.attrgetter(node.args[4].target)(graph_module)
        if any(n.op in ("get_attr", "call_module") for n in subgraph.graph.nodes):
            continue
        inputs = [n for n in subgraph.graph.nodes if n.op == "placeholder"]
        values = dict(zip(inputs, node.args[5:]))
        with graph.inserting_before(node):
            for inner in subgraph.graph.nodes:
                if inner.op == "output":
                    results = inner.args[0]
                elif inner.op != "placeholder":
                    values[inner] = graph.node_copy(inner, values.__getitem__)
        for user in list(node.users):  # getitem(region, i)
            user.replace_all_uses_with(values[results[user.args[1]]])
            graph.erase_node(user)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph_module.delete_all_unused_submodules()
    graph.lint()
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
