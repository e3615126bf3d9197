"""Every quantization setting in one dataclass, named as the CLI flags are (`wbits` is `--wbits`), with the one
validation that both the Python API and the CLI run before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from zeroquant.calib import DISTILLERS
from zeroquant.cpu import cpu_flags, int32_dot_products
from zeroquant.errors import UsageError
from zeroquant.quant.gptq import ROUNDINGS
from zeroquant.quant.ranges import RANGE_METHODS
from zeroquant.quant.reconstruct import EFFORTS
from zeroquant.search.pareto import DEFAULT_CHOICES, OBJECTIVES, Budget, parse_budget

BIAS_CORRECTION = ("auto", "on", "analytic", "off")
RECONSTRUCT = ("auto", "on", "off")
TARGET_CPUS = ("auto", "int32-dot", "portable")
DEVICES = ("auto", "cpu", "cuda")
DISTILL_PRECISIONS = ("float32", "bfloat16")
# the export check's default: beyond a tenth of the logit spread, rounding is not the usual cause
PARITY_TOLERANCE = 0.1


def option(default, help: str):
    """A field with the help text its CLI flag shows: one place for each option's default and meaning."""
    return field(default=default, metadata={"help": help})


@dataclass
class QuantizeOptions:
    wbits: int = option(8, "Weight bits.")
    abits: int = option(8, "Activation bits.")
    budget: str | None = option(None, "Mixed-precision weights: the best point of the frontier (see `zeroquant "
                                      "pareto`) within average bits (4.5), a size (0.2MB) or BOPs with --objective "
                                      "bops (3GBOPs).")
    wbits_choices: tuple[int, ...] = option(DEFAULT_CHOICES, "Candidate weight bits per layer (--budget).")
    objective: str = option("size", "Cost axis of the frontier: size (packed weight bits) or bops.")
    layer_bits: dict[str, int] | None = option(None, "Explicit weight bits per layer, over wbits (Python API).")
    method: str = option("inversion", "Calibration images: inversion, zeroq, genie or noise.")
    ranges: str = option("mse", f"Activation range method: {', '.join(RANGE_METHODS)} (analytic: from the BN "
                                "statistics; auto: the best of all, per tensor).")
    images: int = option(32, "Number of distilled images.")
    batch_size: int = option(32, "Distillation batch size.")
    iterations: int | None = option(None, "Distillation steps (default depends on input size).")
    lr: float = option(0.2, "Distillation learning rate.")
    seed: int = option(0, "Random seed; the same seed gives the same ONNX bytes.")
    device: str = option("auto", "auto, cpu or cuda.")
    distill_precision: str = option("float32", "Arithmetic of distillation: float32, or bfloat16 (autocast: "
                                               "convolutions in bfloat16, the loss and the images' updates in "
                                               "float32): about 2x faster on CPUs with AMX, but its gradients are "
                                               "5 % off in direction and its images calibrated W4A8 worse.")
    input_range: tuple[float, float] | None = option(
        None, "LOW,HIGH: the range your preprocessing gives the model's input, e.g. -1,1 (default: a zoo entry's, "
              "else estimated from the first conv + BN).")
    target_cpu: str = option("auto", "The CPU the file runs on: int32-dot (x86 VNNI or AMX, ARM dot product): full "
                                     "int8 weights; portable: 7-bit weights, safe on AVX2 / AVX-512 without VNNI too; "
                                     "auto: as this CPU.")
    cache: bool = option(True, "Reuse distilled sets and sensitivities from the cache.")
    keep_first_last: int = option(8, "Bits of the first and last layer and their inputs (0: treat them like the "
                                     "rest); with --budget, of their inputs only: the search chooses their weights' "
                                     "bits like the others'.")
    keep_depthwise: int = option(8, "Least weight bits of depthwise convs under a uniform --wbits (0: treat them like "
                                    "the rest; --budget chooses their bits).")
    rounding: str = option("auto", "Weight rounding: gptq (second-order: each weight's error compensated by the "
                                   "others, per layer, towards the float model's output), nearest, or auto (gptq on "
                                   "every layer of a model with any weight or activation below 8 bits, nearest for "
                                   "W8A8).")
    reconstruct: str = option("auto", "Block reconstruction (learned rounding and step sizes): auto (activations "
                                      "below 8 bits), on or off.")
    effort: str = option("default", "Reconstruction effort: fast, default or thorough.")
    bias_correction: str = option("auto", "Correct the output shift of weight rounding: auto (analytic, on "
                                          "networks with depthwise convs), on (measured on the distilled images), "
                                          "analytic (from the BN statistics) or off.")
    equalize: bool = option(False, "Cross-layer equalization of conv -> ReLU -> conv chains (exact; off by default, "
                                   "see the ablation).")
    pack_int4: bool = option(False, "Store weights of <= 4 bits as INT4 (smaller file).")
    pad_channels: bool = option(True, "Widen narrow activations to a multiple of 16 channels and the image to 4 "
                                      "with zero channels, where onnxruntime's integer convs are up to 3x faster "
                                      "(exact; --no-pad-channels keeps the model's widths).")
    parity_tolerance: float = option(PARITY_TOLERANCE, "The largest difference between onnxruntime's outputs and "
                                                       "the simulation's, as a fraction of the logits' spread, that "
                                                       "the export check passes; the refusal says why it is exceeded.")

    @classmethod
    def of(cls, options: QuantizeOptions | None = None, **values) -> QuantizeOptions:
        """`options` (or the defaults) with `values` over them; an unknown name is a UsageError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown option(s) {', '.join(unknown)}", f"known: {', '.join(sorted(known))}")
        base = {f.name: getattr(options, f.name) for f in fields(cls)} if options else {}
        return cls(**(base | values))

    @property
    def reduce_range(self) -> bool:
        """The 7-bit weight grid, for CPUs whose u8s8 kernels add pairs of products in int16 (QuantizedLayer.qmax).
        auto decides by the CPU zeroquant runs on, the one most users also run the file on; the report says which."""
        if self.target_cpu == "auto":
            return not int32_dot_products()
        return self.target_cpu == "portable"

    def weight_grid(self) -> str:
        """What the file's weights are made for, as its metadata says (cpu.WEIGHT_GRID)."""
        return "portable" if self.reduce_range else "int32-dot"

    def weight_grid_note(self) -> str:
        here = f"this CPU: {cpu_flags()}"
        if self.reduce_range:
            return (f"--target-cpu {self.target_cpu} ({here}): weights of non-depthwise layers use the 7-bit grid "
                    "[-63, 63] inside int8, so onnxruntime's u8s8 kernels cannot saturate on CPUs without VNNI")
        return (f"--target-cpu {self.target_cpu} ({here}): full int8 weights [-127, 127], for CPUs whose integer dot "
                "products add in int32 (x86 VNNI or AMX, ARM dot product); on AVX2 or AVX-512 without VNNI they can "
                "saturate: quantize with --target-cpu portable for those")

    def bias_correction_source(self, has_depthwise: bool) -> str | None:
        """Where the input means of bias correction come from: "statistics" (the BN's), "images" (measured on the
        calibration images) or None (no correction). auto corrects networks with depthwise convs, where it measured
        better (benchmarks/ablation), from the statistics: distilled images' channel means are not the training
        data's, and on EfficientNet-Lite0 W4A8 (GPTQ, 0.2.0's inversion images) the measured shift dropped 10.8 and
        11.2 top-1 points on two seeds against 8.0 and 9.6 from the statistics; with real photos the two are even
        (5.6 / 4.0 and 5.6 / 6.4), and at W8A8 equal (benchmarks/RESULTS.md)."""
        if self.bias_correction == "off" or (self.bias_correction == "auto" and not has_depthwise):
            return None
        return "images" if self.bias_correction == "on" else "statistics"

    def reconstructs(self, activation_bits: int) -> bool:
        """auto: with activations below 8 bits (the fewest of any tensor), where GPTQ's rounding alone loses
        accuracy: ResNet-20 W4A4 -10.6 -> -3.6 (78.52 -> 78.68 since GPTQ fits the float model). With 8-bit
        activations it costs minutes for nothing measurable, at any weight bits: EfficientNet-Lite0 W4A8 81.6 % top-1
        (GPTQ) and 81.8 % reconstructed in 4 and 35 minutes; since the float-model fit, ResNet-20 W3A8 80.36 / 80.32 %
        and W2A8 75.38 / 75.58 %, ResNet-32 --budget 3.5 82.66 % both, for 3.5-5x the time (benchmarks/RESULTS.md,
        "Reconstruction with 8-bit activations")."""
        return self.reconstruct == "on" or (self.reconstruct == "auto" and activation_bits < 8)

    def budget_limit(self) -> Budget | None:
        return parse_budget(self.budget, self.wbits_choices, self.objective) if self.budget is not None else None

    def validate(self) -> None:
        for flag, bits in (("wbits", self.wbits), ("abits", self.abits)):
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise UsageError(f"--{flag} {bits} is out of range", "zeroquant supports 2 to 8 bits")
        if any(not 2 <= bits <= 8 for bits in (self.layer_bits or {}).values()):
            raise UsageError("layer_bits must be 2 to 8 bits per layer")
        for flag, bits in (("keep-first-last", self.keep_first_last), ("keep-depthwise", self.keep_depthwise)):
            if bits and not 2 <= bits <= 8:
                raise UsageError(f"--{flag} {bits} is out of range", "0 (off) or 2 to 8 bits")
        for flag, value, allowed in (("reconstruct", self.reconstruct, RECONSTRUCT),
                                     ("rounding", self.rounding, ROUNDINGS),
                                     ("bias-correction", self.bias_correction, BIAS_CORRECTION),
                                     ("effort", self.effort, tuple(EFFORTS)),
                                     ("method", self.method, tuple(DISTILLERS)),
                                     ("ranges", self.ranges, RANGE_METHODS),
                                     ("objective", self.objective, OBJECTIVES),
                                     ("device", self.device, DEVICES),
                                     ("distill-precision", self.distill_precision, DISTILL_PRECISIONS),
                                     ("target-cpu", self.target_cpu, TARGET_CPUS)):
            if value not in allowed:
                raise UsageError(f"unknown --{flag} '{value}'", f"choose one of {', '.join(allowed)}")
        if self.input_range is not None and (len(self.input_range) != 2 or not
                                             float(self.input_range[0]) < float(self.input_range[1])):
            raise UsageError(f"--input-range must be LOW,HIGH with LOW < HIGH, got {self.input_range}")
        if not self.parity_tolerance > 0:
            raise UsageError(f"--parity-tolerance must be positive, got {self.parity_tolerance}")
        if self.images < 1 or self.batch_size < 1 or (self.iterations is not None and self.iterations < 1):
            raise UsageError("--images, --batch-size and --iterations must be positive")
        choices = tuple(self.wbits_choices)
        if not choices or any(not isinstance(b, int) or not 2 <= b <= 8 for b in choices):
            raise UsageError(f"--wbits-choices must be bit-widths from 2 to 8, got {choices}")
        if self.budget is not None and (self.wbits != 8 or self.layer_bits):
            raise UsageError("--budget chooses the weight bits of every layer; it does not combine with --wbits")
        self.budget_limit()  # a budget that cannot be read fails here, before any distillation
