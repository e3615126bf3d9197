"""Write a graph module as ONNX through torch.export + torch.onnx, with a dynamic batch and stable names."""

from __future__ import annotations

import contextlib
import io
import logging

import onnx
import torch
from onnx import helper, numpy_helper
from torch.export import Dim

OPSET = 21  # QuantizeLinear/DequantizeLinear with int4 types; onnxruntime fuses QDQ at this opset
INPUT_NAME, BATCH = "input", "batch"


def to_onnx(module: torch.nn.Module, input_shape: tuple[int, int, int],
            output_names: list[str] = ("logits",)) -> onnx.ModelProto:
    """Export with one float32 NCHW input of dynamic batch, named "input", and the outputs named as given (the
    module returns one tensor, or a tuple of them in that order)."""
    example = torch.zeros(2, *input_shape)
    with torch.no_grad():
        exported = torch.export.export(module, (example,), dynamic_shapes=({0: Dim(BATCH, min=1)},))
    with contextlib.redirect_stdout(io.StringIO()), _quiet("torch.onnx"):  # it narrates its steps on stdout
        program = torch.onnx.export(exported, dynamo=True, opset_version=OPSET, verbose=False)
    model = program.model_proto
    _strip_metadata(model)
    fold_zero_pads(model)
    merge_reshapes(model)
    global_pools(model)
    _rename_value(model, model.graph.input[0].name, INPUT_NAME)
    for output, name in zip(list(model.graph.output), output_names):
        _rename_value(model, output.name, name)
    for value in (model.graph.input[0], *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH
    model.producer_name, model.producer_version = "zeroquant", _version()
    return model


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Only errors from a library's logger (torch.onnx logs, e.g., which optional packages it did not find)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fold_zero_pads(model: onnx.ModelProto) -> None:
    """Move spatial zero Pads ("same" padding written as a separate op) into the Conv after them.

    The pad would otherwise run in float between a DequantizeLinear and a QuantizeLinear and split every depthwise
    block into integer and float islands. Between the Pad and the Conv there may be a Q/DQ pair of the Pad's own
    (shared) scale, and its b-bit Clip; the padded values are already on that grid and 0.0 is its zero point, so
    the fold changes no value.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    removed = set()
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        pad, chain = _behind_qdq(conv.input[0], producer)  # the Pad's own Q/DQ (with a uint8 Clip below 8 bits)
        if pad is None or pad.op_type != "Pad" or len(chain) not in (0, 2, 3):
            continue
        amounts = _spatial_zero_pads(pad, constants)
        if amounts is None or any(len(consumers.get(n.output[0], [])) != 1 for n in [pad, *chain]):
            continue
        conv_pads = next((a for a in conv.attribute if a.name == "pads"), None)
        current = list(conv_pads.ints) if conv_pads else [0, 0, 0, 0]
        new_pads = [c + a for c, a in zip(current, amounts)]
        if conv_pads:
            conv.attribute.remove(conv_pads)
        conv.attribute.append(helper.make_attribute("pads", new_pads))
        conv.input[0] = pad.input[0]
        removed.update(id(n) for n in [pad, *chain])
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    drop_unused_initializers(graph)


def merge_reshapes(model: onnx.ModelProto) -> None:
    """A Reshape of a Reshape reads the first one's input instead (the first is dropped where nothing else reads
    it). A Linear on tokens is flattened to 2-D and back around its Gemm, and LeViT reshapes between its Linears
    besides: levit_128s had 109 such chains, each a node onnxruntime runs. Between the two there may be a Q/DQ pair
    (with its b-bit Clip), which acts per element, so it may as well act on the other shape."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    removed, reshaped = set(), set()
    for reshape in [n for n in graph.node if n.op_type == "Reshape"]:
        shape = constants.get(reshape.input[1])
        if shape is None or 0 in shape:  # a 0 copies a dimension of the input, which the merge would change
            continue
        first, chain = _behind_qdq(reshape.input[0], producer)
        if first is None or first.op_type != "Reshape" or len(chain) not in (0, 2, 3) or \
                any(consumers.get(n.output[0], 0) != 1 for n in [first, *chain]):
            continue
        (chain[-1] if chain else reshape).input[0] = first.input[0]
        removed.add(id(first))
        reshaped.update(n.output[0] for n in chain)  # their shapes are the first reshape's input's now
    for value in [v for v in graph.value_info if v.name in reshaped]:
        graph.value_info.remove(value)
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    drop_unused_initializers(graph)


def _behind_qdq(name: str, producer: dict) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
    """The node producing `name` behind a chain of QuantizeLinear / DequantizeLinear / Clip nodes, and that chain
    (nearest first)."""
    chain = []
    while name in producer and producer[name].op_type in ("DequantizeLinear", "QuantizeLinear", "Clip"):
        chain.append(producer[name])
        name = producer[name].input[0]
    return producer.get(name), chain


def global_pools(model: onnx.ModelProto) -> None:
    """ReduceMean over H and W of an NCHW tensor becomes GlobalAveragePool, which onnxruntime runs as
    QLinearGlobalAveragePool between Q/DQ; ReduceMean has no integer kernel and would run in float. Without keepdims
    (x.mean((2, 3))) a Flatten follows, on the uint8 tensor: the QuantizeLinear after the mean is repeated before it
    (the same grid, so no value changes) and onnxruntime flattens the integers."""
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(graph.value_info) + list(graph.input)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rebuilt = []
    for node in graph.node:
        rebuilt.append(node)
        if node.op_type != "ReduceMean" or len(node.input) != 2 or node.input[1] not in constants:
            continue
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        rank = ranks.get(node.input[0])
        axes = sorted(int(a) % rank for a in constants[node.input[1]]) if rank else None
        if rank != 4 or axes != [2, 3]:
            continue
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        if keepdims:
            continue
        pooled, after = f"{node.output[0]}_pooled", consumers.get(node.output[0], [])
        flat_input = pooled
        if len(after) == 1 and after[0].op_type == "QuantizeLinear":
            quantize = after[0]
            rebuilt += [helper.make_node("QuantizeLinear", [pooled, *quantize.input[1:]], [f"{pooled}_q"]),
                        helper.make_node("DequantizeLinear", [f"{pooled}_q", *quantize.input[1:]], [f"{pooled}_dq"])]
            flat_input = f"{pooled}_dq"
        rebuilt.append(helper.make_node("Flatten", [flat_input], [node.output[0]], axis=1))
        node.output[0] = pooled
    del graph.node[:]
    graph.node.extend(rebuilt)
    drop_unused_initializers(graph)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)


def _spatial_zero_pads(pad: onnx.NodeProto, constants: dict) -> list[int] | None:
    """[top, left, bottom, right] of a constant-mode zero Pad on the H and W axes of an NCHW tensor, else None."""
    mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
    if mode != "constant" or pad.input[1] not in constants:
        return None
    if len(pad.input) > 2 and pad.input[2]:
        value = constants.get(pad.input[2])
        if value is None or float(value) != 0.0:
            return None
    if len(pad.input) > 3 and pad.input[3]:
        return None  # explicit axes: not the exporter's form
    pads = [int(v) for v in constants[pad.input[1]]]
    if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
        return None
    return [pads[2], pads[3], pads[6], pads[7]]


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node provenance (stack traces, source paths): it is most of a small model's bytes
    and would make the file depend on where zeroquant is installed."""
    graph = model.graph
    for item in list(graph.node) + list(graph.value_info) + list(graph.initializer) + list(graph.input) + list(
            graph.output):
        del item.metadata_props[:]
        item.doc_string = ""
    del graph.metadata_props[:]
    del model.metadata_props[:]


def _version() -> str:
    from importlib.metadata import version

    return version("zeroquant")


def _rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    if old == new:
        return
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
