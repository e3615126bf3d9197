"""Fake-quant modules that compute exactly what the exported ONNX file computes.

Activations: per-tensor affine uint8 (values restricted to the b-bit grid), the QuantizeLinear/DequantizeLinear pair.
Weights: per-output-channel symmetric int (zero point 0, as per-channel QLinearConv requires), bias rounded to the
int32 grid of input_scale * weight_scale, as onnxruntime's integer kernels add it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INT32_MAX = 2**31 - 1
# Largest |int32 bias|: the other half of int32 is left to the accumulator it is added to
BIAS_LIMIT = 2**30


def activation_qparams(low: float, high: float, bits: int) -> tuple[float, int]:
    """Scale and zero point of an asymmetric unsigned grid covering [low, high] (always including 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    levels = 2**bits - 1
    scale = max((high - low) / levels, 1e-8)
    zero_point = int(min(max(round(-low / scale), 0), levels))
    return float(scale), zero_point


def symmetric_scales(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-channel scales of a symmetric signed grid [-qmax, qmax] covering +-absmax."""
    return (absmax / qmax).clamp_min(1e-10).float()


ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


class ActivationQuantizer(nn.Module):
    """Per-tensor uint8 fake quantization; an observer may watch the float values during calibration.

    During block reconstruction the step size is learned (LSQ) and, with probability drop_prob per element, the
    float value passes unquantized (QDrop), which keeps the reconstruction from overfitting to one noise pattern.
    """

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits
        self.scale = 1.0
        self.zero_point = 0
        self.enabled = False
        self.observer = None
        self.prior = None  # ranges.ChannelGaussians: the tensor's distribution on the training data, where known
        self.learned_scale: nn.Parameter | None = None
        self.drop_prob = 0.0
        self.generator: torch.Generator | None = None  # QDrop's draws: seeded by the caller, never the global RNG
        # a value the grid must hold exactly, inside its range (see anchored): -3 where a hardsigmoid reads the tensor,
        # 0.5 after a hardsigmoid of a float tensor
        self.on_grid: float | None = None

    def start_learning(self, drop_prob: float, generator: torch.Generator) -> nn.Parameter:
        self.learned_scale = nn.Parameter(torch.tensor([self.scale]))
        self.drop_prob, self.generator = drop_prob, generator
        return self.learned_scale

    def stop_learning(self) -> None:
        self.scale = self.anchored(float(self.learned_scale.detach().abs().clamp_min(1e-8)))
        self.learned_scale, self.drop_prob, self.generator = None, 0.0, None

    def set_range(self, low: float, high: float) -> None:
        scale, self.zero_point = activation_qparams(low, high, self.bits)
        self.scale = self.anchored(scale)
        if self.scale != scale:  # coarser: the zero point that keeps `low` where it was
            self.zero_point = int(min(max(round(-min(low, 0.0) / self.scale), 0), 2**self.bits - 1))

    def anchored(self, scale: float) -> float:
        """The next coarser scale whose grid holds `on_grid` exactly, where the range already reaches it (a range is
        never widened for it: a tensor within +-0.1 would lose 30x its resolution to reach -3).

        A hardsigmoid reading a grid that holds -3 is a Clip of its uint8 tensor to the steps from -3 to 3, read
        with a sixth of the scale (GateQuantizer); without -3 on the grid it is a requantization (QLinearAdd).
        On [0, 1] / 255, 0.5 lies half way between 127 and 128: every input at its zero point is a rounding tie,
        which onnxruntime and the simulation can break in opposite directions on every element (timm fbnetv3_b:
        17 % of the logit range between file and simulation)."""
        if self.on_grid is None:
            return scale
        steps = math.floor(abs(self.on_grid) / scale)
        room = self.zero_point if self.on_grid < 0 else 2**self.bits - 1 - self.zero_point
        return abs(self.on_grid) / steps if 1 <= steps <= room else scale

    def grid(self) -> tuple[float, int]:
        """The scale and zero point its values are read on (a GateQuantizer's may be another quantizer's)."""
        return self.scale, self.zero_point

    @property
    def range(self) -> tuple[float, float]:
        scale, zero_point = self.grid()
        return (-zero_point * scale, (2**self.bits - 1 - zero_point) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
        if not self.enabled:
            return x
        qmax = 2**self.bits - 1
        if self.learned_scale is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, qmax)
        zero = torch.tensor([float(self.zero_point)])
        q = torch._fake_quantize_learnable_per_tensor_affine(x, self.learned_scale.abs() + 1e-8, zero, 0, qmax, 1.0)
        if self.drop_prob:
            q = torch.where(torch.rand(x.shape, generator=self.generator).to(x.device) < self.drop_prob, x, q)
        return q

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale:.6g}, zero_point={self.zero_point}, enabled={self.enabled}"


def steps_to_three(quantizer: ActivationQuantizer) -> int | None:
    """k with 3 = k x scale where the quantizer's grid holds -3 within its range (zero point >= k); None otherwise."""
    scale, zero_point = quantizer.grid()
    steps = round(3 / scale)
    exact = steps >= 1 and abs(steps * scale - 3) <= 3e-6
    return steps if exact and steps <= zero_point else None


class GateQuantizer(ActivationQuantizer):
    """The quantizer after hardsigmoid(x) of a quantized x. Where x's grid (scale s, zero point z) holds -3 = -k s,
    the gate's values clamp(x + 3, 0, 6) / 6 already lie on the grid s / 6 with zero point z - k: that is the grid
    it reads on (`grid`), so quantizing changes nothing and the export writes the gate as a Clip of x's uint8
    tensor. Otherwise (x's range ends above -3, or a step above 3) it reads on its own calibrated grid, which
    `scale` and `zero_point` always hold, as calibration and reconstruction set them."""

    def __init__(self, source: ActivationQuantizer, bits: int = 8):
        super().__init__(bits)
        self.sources = [source]  # in a list: the source is not a child module of this one

    def tied(self) -> tuple[float, int] | None:
        source = self.sources[0]
        steps = steps_to_three(source) if source.learned_scale is None else None
        if steps is None:
            return None
        scale, zero_point = source.grid()
        return scale / 6, zero_point - steps

    def grid(self) -> tuple[float, int]:
        return self.tied() or (self.scale, self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.observer is not None:
            return super().forward(x)
        if self.sources[0].learned_scale is not None:
            return x  # the source's step is being learned: the gate is exact on whatever grid it takes
        tied = self.tied()
        if tied is None:
            return super().forward(x)  # its own grid, fixed or being learned
        return torch.fake_quantize_per_tensor_affine(x, *tied, 0, 2**self.bits - 1)


class QuantizedLayer(nn.Module):
    """A conv2d or linear layer (BN already folded) with per-channel weight and int32 bias fake quantization."""

    def __init__(self, name: str, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, bits: int = 8,
                 conv_args: tuple = (), reduce_range: bool = False):
        super().__init__()
        self.name = name
        self.kind = kind
        self.conv_args = conv_args  # stride, padding, dilation, groups
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach().clone()
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.bits = bits
        self.reduce_range = reduce_range and not self.is_depthwise
        self.register_buffer("weight_scale", symmetric_scales(self.channel_absmax(), self.qmax))
        # bias correction's shift, added only when the layer is quantized: the float path must stay the float model,
        # since reconstruction takes its targets from it
        self.register_buffer("bias_shift", torch.zeros_like(self.bias))
        self.register_buffer("quantized_bias", self.bias.detach().clone())
        self.input_scale: float | None = None
        self.enabled = False
        self.rounding: nn.Parameter | None = None  # AdaRound logits while a reconstruction learns the rounding
        self.learned_scale: nn.Parameter | None = None
        # the weights whose nearest rounding is the chosen one once GPTQ or AdaRound have decided it; the float
        # weights stay as they are, since the float path is the reference bias correction and reconstruction use
        self.register_buffer("round_from", None)
        self.bias_fitted = False  # GPTQ fitted bias_shift to the float model's output: bias correction leaves it

    def channel_absmax(self) -> torch.Tensor:
        return self.weight.detach().abs().flatten(1).amax(1)

    def set_bits(self, bits: int) -> None:
        """Change the weight bit-width; scales go back to min-max on the new grid (and a rounding or bias shift decided
        for the old grid is dropped)."""
        self.bits = bits
        self.round_from = None
        self.bias_shift = torch.zeros_like(self.bias_shift)
        self.bias_fitted = False
        self.set_weight_scale(symmetric_scales(self.channel_absmax(), self.qmax))

    def set_weight_scale(self, scale: torch.Tensor) -> None:
        self.weight_scale = scale.float().clamp_min(1e-10)
        self.refresh_bias()

    @property
    def corrected_bias(self) -> torch.Tensor:
        """The bias of the quantized layer: the float bias plus bias correction's shift."""
        return self.bias.detach() + self.bias_shift

    def refresh_bias(self) -> None:
        """Round the bias to the int32 grid onnxruntime uses; needs the scale of this layer's input quantizer.

        The grid's step is input scale x weight scale, so a channel whose weights are nearly zero (a BN channel with
        gamma ~0 folded into its conv) but whose bias is not would need a bias beyond int32; clamped, EfficientNet-
        Lite0's stem lost up to 7 units on four such channels (its output's MSE 2.9; 0.0017 with the step below; 68
        channels in 25 of its layers need it). Such a channel gets the least weight step at which its bias fits: its
        weights, too small to matter beside the bias, round to zero or near it."""
        if self.input_scale is None:
            self.quantized_bias = self.corrected_bias
            return
        fitting = (self.corrected_bias.abs() / (self.input_scale * BIAS_LIMIT)).float()
        self.weight_scale = torch.maximum(self.weight_scale, fitting)
        step = self.input_scale * self.weight_scale
        self.quantized_bias = (self.corrected_bias / step).round() * step

    @property
    def is_depthwise(self) -> bool:
        return self.kind == "conv" and self.conv_args[3] > 1 and self.weight.shape[1] == 1

    @property
    def qmax(self) -> int:
        """Largest integer weight. With reduce_range, at most 63: onnxruntime's u8s8 GEMM kernels on x86 CPUs without
        VNNI add pairs of uint8*int8 products in int16 and saturate beyond 32767; 255*63*2 never does. Depthwise
        convs use a kernel that accumulates in int32, so they keep the full grid."""
        full = 2 ** (self.bits - 1) - 1
        return min(full, 63) if self.reduce_range else full

    def rounded_weights(self) -> torch.Tensor:
        """What is rounded to the grid: the float weights, or where a rounding method has decided, its choice."""
        return (self.weight if self.round_from is None else self.round_from).detach()

    def integer_weight(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return (self.rounded_weights() / self.weight_scale.reshape(shape)).round().clamp(-self.qmax, self.qmax)

    def _scale_shape(self) -> tuple:
        return (-1,) + (1,) * (self.weight.dim() - 1)

    def start_rounding(self) -> list[nn.Parameter]:
        """AdaRound: learn whether each weight rounds up or down, and the per-channel step size (LSQ)."""
        scaled = self.rounded_weights() / self.weight_scale.reshape(self._scale_shape())
        self.register_buffer("floor_weight", scaled.floor(), persistent=False)
        rest = (scaled - scaled.floor()).clamp(0.01, 0.99)
        self.rounding = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.learned_scale = nn.Parameter(self.weight_scale.clone())
        return [self.rounding, self.learned_scale]

    def rounding_up(self) -> torch.Tensor:
        """h(alpha) in [0, 1]: the soft decision to round up."""
        return torch.clamp(torch.sigmoid(self.rounding) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def soft_weight(self) -> torch.Tensor:
        integer = torch.clamp(self.floor_weight + self.rounding_up(), -self.qmax, self.qmax)
        return integer * self.learned_scale.abs().reshape(self._scale_shape())

    def stop_rounding(self) -> None:
        """Harden the rounding: the weights become exact grid values of the learned step size."""
        scale = self.learned_scale.detach().abs().clamp_min(1e-10)
        integer = torch.clamp(self.floor_weight + (self.rounding.detach() >= 0).float(), -self.qmax, self.qmax)
        self.round_from = integer * scale.reshape(self._scale_shape())
        self.rounding = self.learned_scale = None
        del self.floor_weight
        self.set_weight_scale(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.rounding is not None:
            weight, bias = self.soft_weight(), self.corrected_bias
        elif self.enabled:
            zero = torch.zeros_like(self.weight_scale, dtype=torch.int32)
            weight = torch.fake_quantize_per_channel_affine(self.rounded_weights(), self.weight_scale, zero, 0,
                                                            -self.qmax, self.qmax)
            bias = self.quantized_bias
        else:
            weight, bias = self.weight, self.bias
        if self.kind == "conv":
            return F.conv2d(x, weight, bias, *self.conv_args)
        return F.linear(x, weight, bias)

    @property
    def macs_per_output(self) -> int:
        """Multiply-accumulates per output element (times output elements = the layer's MACs)."""
        return self.weight[0].numel()

    def extra_repr(self) -> str:
        return f"{self.kind} {tuple(self.weight.shape)}, bits={self.bits}, enabled={self.enabled}"
