"""The quantization report: plain dataclasses, written as JSON beside the ONNX file and shown as a rich table, and
the notes that explain to the user what the recipe chose and why (the pipeline decides; these say it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from zeroquant.census import KEPT_FLOAT, Census

NO_KERNEL = ("onnxruntime has no integer kernel for it, so it runs in float between a DequantizeLinear and a "
             "QuantizeLinear")


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


def float_op_notes(census: Census) -> list[str]:
    """Every op onnxruntime runs in float, with why."""
    return [f"{op} x{count}: {KEPT_FLOAT.get(op, NO_KERNEL)}" for op, count in census.float_ops.items()] + \
        [f"{op} x{count}: works on the model's float output" for op, count in census.output_float_ops.items()]


def unfolded_bn_note(count: int) -> str:
    return (f"{count} BatchNorm layer(s) follow no conv/linear (e.g. pre-activation BN): each runs as the depthwise "
            "1x1 conv it equals, in an integer kernel")


def equalize_note(pairs: int) -> str:
    return (f"cross-layer equalization rescaled {pairs} conv -> ReLU -> conv pair(s) (chains through ReLU6 are left "
            "alone: it does not commute with scaling)")


def input_range_note(low: float, high: float, source: str) -> str:
    return f"input range [{low:.4g}, {high:.4g}]: {source}"


def first_last_note(bits: int, given: list[str], by_budget: bool) -> str:
    """The first and last layers pinned at `bits`, except the weights of the `given` ones (the budget's choice or
    explicit layer_bits)."""
    source = "the --budget search" if by_budget else "layer_bits"
    return (f"the first and last layers and their inputs stay at {bits} bits (--keep-first-last 0 quantizes them "
            "like the rest)" + (f", except the weights of {', '.join(given)}: they keep the bits {source} gives "
                                "them" if given else ""))


def depthwise_note(count: int, bits: int) -> str:
    return (f"{count} depthwise conv(s) keep {bits}-bit weights: they hold few weights but lose the most at low bits "
            "(--keep-depthwise 0 quantizes them like the rest)")


def multiplier_note(count: int) -> str:
    return (f"{count} grouped conv(s) with a channel multiplier run as depthwise convs over repeated input channels, "
            "onnxruntime's fast kernel (exact; its generic grouped path measured up to 30x slower)")


def padding_note(groups: int, image_channels: int) -> str:
    """Channel padding (export/channel_padding.py) in the user's words."""
    widened = [f"{groups} group(s) of activations to a multiple of 16 channels"] if groups else []
    if image_channels:
        widened.append(f"the input image by {image_channels} channel(s) to a multiple of 4")
    return (f"widened {' and '.join(widened)} with zero channels, where onnxruntime's integer convs run up to 3x "
            "faster (exact: the outputs do not change)")


def int4_note(count: int) -> str:
    return (f"{count} layer(s) store INT4 weights (--pack-int4), widened to int8 by a Cast that onnxruntime folds "
            "when it loads the file: they still run in integer kernels")
