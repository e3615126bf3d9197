"""A grouped conv with a channel multiplier (one input channel per group, k > 1 outputs each, as FastViT's patch
embedding's 7x7 stride-2 conv 48 -> 96) becomes a depthwise conv over its input with each channel repeated k times.

onnxruntime's QLinearConv has a fast kernel for depthwise convs only (groups = input channels = output channels);
a multiplier conv goes through its generic per-group path. Measured (onnxruntime 1.32, AVX-512 VNNI, 1 thread):
that 48 -> 96 conv over 56x56 took 9.2 ms, the repeat (Unsqueeze, Expand, Reshape on the uint8 tensor) and the
depthwise conv 0.2 ms; fastvit_t8 spent 12 of its 27 ms in four such convs. Exact: output channel g*k + j reads
input channel g with the same weights either way.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from zeroquant.export.channel_padding import has_subgraphs, set_group


def repeat_multiplier_convs(model: onnx.ModelProto) -> int:
    """Rewrite in place every Conv whose input is a DequantizeLinear of a uint8 tensor, with groups = input
    channels and k x as many outputs (k > 1); returns how many."""
    graph = model.graph
    if has_subgraphs(graph):
        return 0
    inits = {init.name: init for init in graph.initializer}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in shape_inference.infer_shapes(model).graph.value_info}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    rebuilt, dropped, count = [], set(), 0
    for node in graph.node:
        if node.op_type == "Conv" and (dequantize := _quantized_input(node, producer, shapes, inits)) is not None:
            if readers[node.input[0]] == 1:
                dropped.add(id(dequantize))  # the conv was its only reader
            nodes, constants = _repeat(node, dequantize, shapes)
            graph.initializer.extend(constants)
            rebuilt += nodes
            count += 1
        rebuilt.append(node)
    if count:
        del graph.node[:]
        graph.node.extend(node for node in rebuilt if id(node) not in dropped)
    return count


def _quantized_input(conv: onnx.NodeProto, producer: dict, shapes: dict, inits: dict) -> onnx.NodeProto | None:
    """The per-tensor DequantizeLinear feeding a multiplier conv (groups = input channels, k > 1 outputs each),
    else None."""
    group = next((a.i for a in conv.attribute if a.name == "group"), 1)
    dequantize = producer.get(conv.input[0])
    x, y = shapes.get(conv.input[0]), shapes.get(conv.output[0])
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or x is None or y is None or len(x) != 4 or \
            None in x[1:] or y[1] is None or dequantize.input[1] not in inits or \
            numpy_helper.to_array(inits[dequantize.input[1]]).size != 1:
        return None
    return dequantize if group == x[1] > 1 and y[1] > x[1] and y[1] % x[1] == 0 else None


def _repeat(conv: onnx.NodeProto, dequantize: onnx.NodeProto, shapes: dict):
    """The nodes and constants that repeat each channel of the conv's uint8 input k times and dequantize it as
    before; `conv` is rewired to read them as a depthwise conv."""
    channels, height, width = shapes[conv.input[0]][1:]
    outputs, tag = shapes[conv.output[0]][1], conv.output[0]
    constants = [numpy_helper.from_array(np.array([2], np.int64), f"{tag}_repeat_axis"),
                 numpy_helper.from_array(np.array([1, channels, outputs // channels, 1, 1], np.int64),
                                         f"{tag}_repeat_shape"),
                 numpy_helper.from_array(np.array([0, outputs, height, width], np.int64), f"{tag}_repeated_shape")]
    nodes = [helper.make_node("Unsqueeze", [dequantize.input[0], f"{tag}_repeat_axis"], [f"{tag}_unsqueezed"]),
             helper.make_node("Expand", [f"{tag}_unsqueezed", f"{tag}_repeat_shape"], [f"{tag}_expanded"]),
             helper.make_node("Reshape", [f"{tag}_expanded", f"{tag}_repeated_shape"], [f"{tag}_repeated"]),
             helper.make_node("DequantizeLinear", [f"{tag}_repeated", *dequantize.input[1:]], [f"{tag}_input"])]
    nodes[-1].attribute.extend(dequantize.attribute)
    conv.input[0] = f"{tag}_input"
    set_group(conv, outputs)
    return nodes, constants
