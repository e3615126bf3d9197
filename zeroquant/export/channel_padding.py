"""Round narrow channel counts up to a multiple of 16 with zero channels, where onnxruntime's integer kernels
are several times slower off that multiple.

Measured with onnxruntime 1.32 on an AVX-512 VNNI CPU, one thread (benchmarks/RESULTS.md, channel padding): a uint8
3x3 depthwise QLinearConv over 56x56 takes 139 us with 12 channels and 44 us with 16, 143 us with 20 and 59 us with
32; a pointwise one writing 8 or 12 channels takes 28-33 us and 12-13 us writing 16. Narrow mobile nets
(repghostnet_050, lcnet_050) spend most of their time in such layers and ran slower than float because of it.

A padded channel is exact: the conv that writes it has zero weights and bias, so it holds 0.0 (every activation
grid holds 0.0 exactly at its zero point); per-element ops, pools and depthwise convs (zero weights again) keep it
in its own channel, and every conv that reads it across channels gives it zero weights. Channels are padded only
where every op that touches the tensors is one of those: a residual Add of two padded tensors is fine, a Concat,
Reshape, Gemm, graph output or per-channel constant is not, and the tensors keep their width.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from zeroquant.export.onnx_export import drop_unused_initializers

MULTIPLE = 16
IMAGE_MULTIPLE = 4  # a 3x3 stride-2 stem over 3 channels: 0.29 ms, over 4: 0.16 ms (16 out, 224 px)
# ops that keep a channel in its own channel and give a finite value for zeros (not Div: 0 / 0, which a zero
# weight would not cancel)
PER_ELEMENT = {"QuantizeLinear", "DequantizeLinear", "Clip", "Relu", "Sigmoid", "HardSigmoid", "HardSwish",
               "LeakyRelu", "Identity", "Add", "Sub", "Mul", "GlobalAveragePool", "AveragePool", "MaxPool"}
INTEGER_WEIGHTS = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


class _Groups:
    """Union-find over tensor names: tensors that must have the same channels, padded together or not at all."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def join(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def pad_channels(model: onnx.ModelProto, multiple: int = MULTIPLE) -> int:
    """Pad in place every group of activations whose channel count is not a multiple of `multiple` and whose
    every reader and writer can take zero channels; returns how many groups were padded."""
    graph = model.graph
    if has_subgraphs(graph):
        return 0
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in shape_inference.infer_shapes(model).graph.value_info}
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def constant(name: str) -> np.ndarray | None:
        """An initializer, or a DequantizeLinear of initializers (a quantized constant), else None."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and all(i in inits for i in node.input if i):
            return numpy_helper.to_array(inits[node.input[0]])
        return None

    def channels(name: str) -> int | None:
        dims = shapes.get(name)
        return dims[1] if dims is not None and len(dims) == 4 else None

    groups, blocked = _Groups(), [v.name for v in list(graph.input) + list(graph.output)]
    writers, readers, depthwise = [], [], []  # group=1 convs by the tensor they write / read; depthwise convs
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            continue  # a weight, a bias or a quantized constant: the convs and per-element ops see to those
        if node.op_type == "Conv":
            weight = _integer_weight(node, producer, inits, uses)
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            cin, cout = channels(node.input[0]), channels(node.output[0])
            if weight is not None and cin is not None and group == cin == cout and weight.dims[1] == 1:
                groups.join(node.input[0], node.output[0])
                depthwise.append(node)
            elif weight is not None and cin is not None and cout is not None and group == 1:
                readers.append((node, node.input[0]))
                writers.append((node, node.output[0]))
            else:
                blocked += [node.input[0], node.output[0]]
        elif node.op_type in PER_ELEMENT:
            output, width = node.output[0], channels(node.output[0])
            if any(node.output[1:]):  # MaxPool's indices
                blocked += list(node.input) + list(node.output)
            for name in [name for name in node.input if name]:
                value = constant(name)
                if value is not None:
                    if value.size > 1:  # a per-channel grid or constant would need padding too
                        blocked.append(output)
                elif width is not None and channels(name) == width:
                    groups.join(name, output)
                elif width is not None and channels(name) == 1:
                    blocked.append(name)  # broadcast over channels (a spatial gate): it keeps its one channel
                else:
                    blocked += [name, output]
        else:
            blocked += [name for name in list(node.input) + list(node.output) if name]
    blocked_groups = {groups.find(name) for name in blocked}

    members: dict[str, list[str]] = {}
    for name in list(groups.parent):
        members.setdefault(groups.find(name), []).append(name)
    padded = 0
    for root, names in sorted(members.items()):
        widths = {channels(name) for name in names}
        if root in blocked_groups or len(widths) != 1 or None in widths:
            continue
        width = widths.pop()
        extra = -width % multiple
        if not extra or not any(groups.find(name) == root for _, name in writers):
            continue
        for conv, name in writers:
            if groups.find(name) == root:
                _pad_conv(conv, producer, inits, uses, graph, extra, axis=0)
        for conv in depthwise:
            if groups.find(conv.output[0]) == root:
                _pad_conv(conv, producer, inits, uses, graph, extra, axis=0)
                set_group(conv, width + extra)
        for conv, name in readers:
            if groups.find(name) == root:
                _pad_conv(conv, producer, inits, uses, graph, extra, axis=1)
        convs = [conv for conv, name in writers + readers if groups.find(name) == root] + \
            [conv for conv in depthwise if groups.find(conv.output[0]) == root]
        _forget_shapes(graph, set(names), convs, producer)
        padded += 1
    drop_unused_initializers(graph)  # the shared originals of padded copies
    return padded


def pad_image_channels(model: onnx.ModelProto, multiple: int = IMAGE_MULTIPLE) -> int:
    """Widen the quantized model input (3 colour channels) to a multiple of `multiple` with a Pad of its zero point
    on the uint8 tensor, and give the convs that read it zero weights for the new channels. Only where the input's
    QuantizeLinear -> DequantizeLinear feeds nothing but such convs; returns how many channels were added."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if len(graph.input) != 1 or opset < 11 or has_subgraphs(graph):  # Pad takes its amounts as inputs from 11
        return 0
    dims = graph.input[0].type.tensor_type.shape.dim
    width = dims[1].dim_value if len(dims) == 4 and dims[1].HasField("dim_value") else 0
    extra = -width % multiple
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
            readers.setdefault(name, []).append(node)
    quantizers = readers.get(graph.input[0].name, [])
    if not width or not extra or len(quantizers) != 1 or quantizers[0].op_type != "QuantizeLinear":
        return 0
    quantize = quantizers[0]
    zero_point = inits.get(quantize.input[2]) if len(quantize.input) > 2 else None
    dequantizers = readers.get(quantize.output[0], [])
    convs = [conv for dq in dequantizers for conv in readers.get(dq.output[0], [])]
    outputs = {v.name for v in graph.output}
    if zero_point is None or zero_point.dims or not dequantizers or \
            any(dq.op_type != "DequantizeLinear" or dq.output[0] in outputs or
                dq.input[1:3] != quantize.input[1:3] for dq in dequantizers) or \
            any(conv.op_type != "Conv" or conv.input[0] not in {dq.output[0] for dq in dequantizers} or
                next((a.i for a in conv.attribute if a.name == "group"), 1) != 1 or
                _integer_weight(conv, producer, inits, uses) is None for conv in convs):
        return 0
    padded, amounts = f"{quantize.output[0]}_padded", f"{quantize.output[0]}_pads"
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), amounts))
    for dequantize in dequantizers:
        dequantize.input[0] = padded
    for conv in convs:
        _pad_conv(conv, producer, inits, uses, graph, extra, axis=1)
    _forget_shapes(graph, {dq.output[0] for dq in dequantizers}, convs, producer)
    nodes = list(graph.node)  # copied by extend() below: every change to them is made above
    nodes.insert(nodes.index(quantize) + 1, onnx.helper.make_node("Pad", [quantize.output[0], amounts,
                                                                         quantize.input[2]], [padded], name=padded))
    del graph.node[:]
    graph.node.extend(nodes)
    return extra


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """Whether a node holds a subgraph (If, Loop, Scan), whose reads of outer tensors these rewrites do not see."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node
               for a in n.attribute)


def set_group(conv: onnx.NodeProto, groups: int) -> None:
    """Set a conv's group attribute, adding it where the conv relied on the default of 1."""
    for attribute in conv.attribute:
        if attribute.name == "group":
            attribute.i = groups
            return
    conv.attribute.append(onnx.helper.make_attribute("group", groups))


def _forget_shapes(graph: onnx.GraphProto, activations: set[str], convs: list, producer: dict) -> None:
    """Drop the recorded shapes of padded tensors: the activations, the convs' weights and biases (the
    DequantizeLinear outputs) and the initializers behind them."""
    stale = activations | {name for conv in convs for name in conv.input[1:]}
    stale |= {init for name in list(stale) if name in producer for init in producer[name].input}
    for value in [v for v in graph.value_info if v.name in stale]:
        graph.value_info.remove(value)


def _integer_weight(conv: onnx.NodeProto, producer: dict, inits: dict, uses: dict) -> onnx.TensorProto | None:
    """The conv's int8/uint8 weight initializer behind its DequantizeLinear, if only this conv reads it (zeroquant's
    census finds a layer by its weight's name) and its bias, if any, is a DequantizeLinear of an initializer too;
    else None."""
    dequantize = producer.get(conv.input[1])
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.input[0] not in inits:
        return None
    weight = inits[dequantize.input[0]]
    if weight.data_type not in INTEGER_WEIGHTS or uses.get(weight.name, 0) != 1 or uses.get(conv.input[1]) != 1:
        return None
    dequantizers = [dequantize]
    if len(conv.input) > 2 and conv.input[2]:
        bias = producer.get(conv.input[2])
        if bias is None or bias.op_type != "DequantizeLinear" or uses.get(conv.input[2]) != 1:
            return None
        dequantizers.append(bias)
    for node in dequantizers:  # all initializers, and zero points of 0, so that a zero weight is a 0
        if any(name and name not in inits for name in node.input) or \
                (len(node.input) > 2 and node.input[2] and numpy_helper.to_array(inits[node.input[2]]).any()):
            return None
    return weight


def _pad_conv(conv: onnx.NodeProto, producer: dict, inits: dict, uses: dict, graph: onnx.GraphProto, extra: int,
              axis: int) -> None:
    """Append `extra` zero output channels (axis 0: the weight, its per-channel scale and zero point, the bias and
    its) or zero input channels (axis 1: the weight only). A padded channel repeats the last channel's scale:
    onnxruntime fuses a conv into QLinearConv only where each bias scale is input scale x weight scale."""
    weight_dq = producer[conv.input[1]]
    dequantizers = [weight_dq] + ([producer[conv.input[2]]] if axis == 0 and len(conv.input) > 2 and conv.input[2]
                                  else [])
    for dequantize in dequantizers:
        for slot in range(3 if axis == 0 else 1):
            name = dequantize.input[slot] if slot < len(dequantize.input) else ""
            values = numpy_helper.to_array(inits[name]) if name else None
            if values is None or values.ndim == 0:
                continue
            widths = [(0, 0)] * values.ndim
            widths[axis] = (0, extra)
            padded = np.pad(values, widths, "edge" if slot == 1 else "constant")
            if uses[name] > 1:  # exporters keep one initializer for equal tensors: the others keep theirs
                uses[name] -= 1
                name = f"{dequantize.output[0]}_padded_{slot}"
                inits[name] = graph.initializer.add()
                uses[name] = 1
                dequantize.input[slot] = name
            inits[name].CopyFrom(numpy_helper.from_array(padded, name))
