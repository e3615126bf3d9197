"""--pack-int4: store weights of 4 bits or fewer as opset-21 INT4 initializers (two values a byte).

The file shrinks, but onnxruntime has no int4 convolution kernel: a DequantizeLinear from INT4 feeds a float Conv,
so those layers run in float. The census in the report shows which.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from zeroquant.export.onnx_export import drop_unused_initializers


def _int4_tensor(name: str, values: np.ndarray) -> TensorProto:
    flat = values.astype(np.int8).flatten()
    if len(flat) % 2:
        flat = np.append(flat, 0)
    nibbles = (flat.astype(np.uint8) & 0x0F).reshape(-1, 2)
    packed = (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8)  # first element in the low nibble
    return helper.make_tensor(name, TensorProto.INT4, values.shape, packed.tobytes(), raw=True)


def pack_int4(model: onnx.ModelProto, weight_names: set[str]) -> None:
    """Rewrite the named int8 weight initializers (values within [-7, 7]) and their zero points as INT4."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in weight_names:
            continue
        weight = numpy_helper.to_array(initializers[node.input[0]])
        if np.abs(weight).max(initial=0) > 7:
            raise ValueError(f"{node.input[0]} has values beyond the int4 range")
        initializers[node.input[0]].CopyFrom(_int4_tensor(node.input[0], weight))
        zero_name = f"{node.input[0]}_zero_point_int4"
        scale = numpy_helper.to_array(initializers[node.input[1]])
        graph.initializer.append(_int4_tensor(zero_name, np.zeros(scale.shape, dtype=np.int8)))
        if len(node.input) > 2:
            node.input[2] = zero_name
        else:
            node.input.append(zero_name)
    for info in [v for v in graph.value_info if v.name in weight_names]:
        graph.value_info.remove(info)  # the exporter typed them int8
    drop_unused_initializers(graph)
