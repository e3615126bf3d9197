"""The quantization report: plain dataclasses, written as JSON beside the ONNX file and shown as a rich table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    name: str
    kind: str
    weight_bits: int
    weight_qmax: int
    depthwise: bool
    macs: int
    input_range: list[float] | None
    input_bits: int | None


@dataclass
class QuantizeReport:
    model: str
    output: str
    outputs: list[str]  # the ONNX model's output names (a dict model's keys)
    settings: dict
    layers: list[LayerReport]
    activation_ranges: dict[str, list[float]]
    float_ops: list[str]  # the ops onnxruntime runs in float, and why
    sizes: dict[str, float]
    timings: dict[str, float]
    parity: dict
    census: dict
    distillation: dict
    reconstruction: list[dict] = field(default_factory=list)  # per block: layers, MSE before and after
    rounding: list[dict] = field(default_factory=list)  # per layer: output error of nearest and GPTQ rounding
    notes: list[str] = field(default_factory=list)

    def to_dict(self, with_timings: bool = True) -> dict:
        data = asdict(self)
        if not with_timings:
            data.pop("timings")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass
class QuantizeResult:
    """What zeroquant.quantize returns: the report and the verified model's bytes."""

    report: QuantizeReport
    onnx: bytes  # the integer ONNX model
    float_onnx: bytes | None = None  # the float32 ONNX model, when asked for (float_output)
