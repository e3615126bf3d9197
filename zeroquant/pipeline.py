"""`zeroquant.quantize`: model in, verified integer ONNX file and report out, with no real data."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from zeroquant.calib import DISTILLERS, CalibSet, DistillSettings
from zeroquant.calib import cache as calib_cache
from zeroquant.errors import UnsupportedModelError, UsageError, VerificationError
from zeroquant.export import verify
from zeroquant.export.int4 import pack_int4
from zeroquant.export.integer_model import integer_model
from zeroquant.export.onnx_export import to_onnx, write_atomic
from zeroquant.graph.batchnorm import batchnorm_nodes, fold_batchnorm
from zeroquant.graph.capture import capture
from zeroquant.quant.bias_correction import correct_biases
from zeroquant.quant.calibrate import calibrate
from zeroquant.quant.equalize import equalize
from zeroquant.quant.ranges import RANGE_METHODS
from zeroquant.quant.reconstruct import EFFORTS, reconstruct
from zeroquant.quant.sim import QuantSim, build_quantsim
from zeroquant.report import LayerReport, QuantizeReport
from zeroquant.zoo.loading import LoadedModel



BIAS_CORRECTION = ("auto", "on", "analytic", "off")


@dataclass
class QuantizeOptions:
    weight_bits: int = 8
    activation_bits: int = 8
    method: str = "zeroq"
    range_method: str = "mse"
    num_images: int = 32
    batch_size: int = 32
    iterations: int | None = None  # None: the method's measured default for this input size
    lr: float = 0.2
    seed: int = 0
    device: str = "auto"
    reduce_range: bool = True
    use_cache: bool = True
    layer_bits: dict[str, int] | None = None  # per-layer weight bits (mixed precision) over weight_bits
    keep_first_last: int = 8  # bits of the first and last layer (weights and their inputs); 0 = no exception
    keep_depthwise: int = 8  # least weight bits of depthwise convs under a uniform --wbits; 0 = no exception
    reconstruct: str = "auto"  # block reconstruction: auto (below 8 bits), on, off
    bias_correction: str = "auto"  # auto: on (measured) for networks with depthwise convs; on, analytic, off
    equalize: bool = False  # cross-layer equalization of conv -> ReLU -> conv chains (off: see benchmarks/ablation)
    effort: str = "default"
    pack_int4: bool = False  # weights of <= 4 bits as INT4 initializers: smaller file, those layers run in float

    def validate(self) -> None:
        for label, bits in (("--wbits", self.weight_bits), ("--abits", self.activation_bits)):
            if not 2 <= bits <= 8:
                raise UsageError(f"{label} {bits} is out of range", "zeroquant supports 2 to 8 bits")
        if any(not 2 <= bits <= 8 for bits in (self.layer_bits or {}).values()):
            raise UsageError("layer_bits must be 2 to 8 bits per layer")
        for flag, bits in (("--keep-first-last", self.keep_first_last), ("--keep-depthwise", self.keep_depthwise)):
            if bits and not 2 <= bits <= 8:
                raise UsageError(f"{flag} {bits} is out of range", "0 (off) or 2 to 8 bits")
        for flag, value, allowed in (("--reconstruct", self.reconstruct, ("auto", "on", "off")),
                                     ("--bias-correction", self.bias_correction, BIAS_CORRECTION)):
            if value not in allowed:
                raise UsageError(f"unknown {flag} '{value}'", f"choose {', '.join(allowed)}")
        if self.effort not in EFFORTS:
            raise UsageError(f"unknown --effort '{self.effort}'", f"choose one of {', '.join(EFFORTS)}")
        if self.method not in DISTILLERS:
            raise UsageError(f"unknown --method '{self.method}'", f"choose one of {', '.join(DISTILLERS)}")
        if self.range_method not in RANGE_METHODS:
            raise UsageError(f"unknown --ranges '{self.range_method}'", f"choose one of {', '.join(RANGE_METHODS)}")
        if self.num_images < 1 or self.batch_size < 1 or (self.iterations is not None and self.iterations < 1):
            raise UsageError("--images, --batch-size and --iterations must be positive")


def default_iterations(input_shape) -> int:
    """Measured on this project's CPU budget: small inputs converge in 200 Adam steps; 224 px nets get fewer
    steps on the same clock (the ZeroQ loss plateaus early there, see benchmarks/RESULTS.md)."""
    return 200 if input_shape[1] * input_shape[2] <= 64 * 64 else 50


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available", "use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device '{name}'", "choose auto, cpu or cuda")
    return torch.device(name)


def distill(loaded: LoadedModel, graph_module, input_shape, options: QuantizeOptions, progress=None):
    """Distilled calibration images, from the cache when the same model and settings were distilled before."""
    device = resolve_device(options.device)
    settings = DistillSettings(options.num_images, options.batch_size,
                               options.iterations or default_iterations(input_shape), options.lr, options.seed)
    if options.method != "noise" and not batchnorm_nodes(graph_module):
        raise UnsupportedModelError(
            "the model has no BatchNorm layers, so there are no statistics to distill calibration images from",
            "use --method noise (Gaussian-noise calibration)")
    key = calib_cache.cache_key(loaded.digest, options.method, settings.key(), input_shape, device.type)
    cached = calib_cache.load(key) if options.use_cache else None
    if cached is not None:
        return cached, True
    torch.manual_seed(options.seed)
    calib = DISTILLERS[options.method].distill(graph_module, input_shape, settings, device, progress)
    if options.use_cache:
        calib_cache.store(key, calib)
    return calib, False


def keep_depthwise(sim: QuantSim, bits: int) -> int:
    """Depthwise convs get at least `bits` weight bits; returns how many were raised. They hold few weights (4 % of
    EfficientNet-Lite0's) but lose the most at 4 bits: Lite0 W4A8 went from 56.6 to 72.6 % top-1 with them at 8."""
    raised = [layer for layer in sim.layers.values() if layer.is_depthwise and layer.bits < bits]
    for layer in raised:
        layer.set_bits(bits)
    return len(raised)


def keep_first_last(sim: QuantSim, bits: int) -> None:
    """The first and last layers (and the tensors they read) stay at `bits`: the image and the logits are where
    low-bit noise costs the most accuracy for the least size."""
    if not bits or not sim.layers:
        return
    names = list(sim.layers)
    for name in {names[0], names[-1]}:
        sim.layers[name].set_bits(max(bits, sim.layers[name].bits))
        feeding = sim.layer_inputs.get(name)
        if feeding:
            sim.activations[feeding].bits = max(bits, sim.activations[feeding].bits)


def _layer_report(sim: QuantSim, name: str, macs: int) -> LayerReport:
    layer, feeding = sim.layers[name], sim.layer_inputs.get(name)
    quantizer = sim.activations[feeding] if feeding else None
    return LayerReport(layer.name, layer.kind, layer.bits, layer.qmax, layer.is_depthwise, macs,
                       list(quantizer.range) if quantizer else None, quantizer.bits if quantizer else None)


def layer_macs(sim: QuantSim, input_shape) -> dict[str, int]:
    """Multiply-accumulates of every conv/linear layer for one image."""
    macs, hooks = {}, []
    for name, layer in sim.layers.items():
        hooks.append(layer.register_forward_hook(
            lambda module, _, out, name=name: macs.__setitem__(name, out[0].numel() * module.macs_per_output)))
    try:
        with torch.no_grad():
            sim(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return macs


def stopwatch(timings: dict):
    """lap(stage) puts the seconds since the previous lap (or since this call) in timings[stage]."""
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        clock = now

    return lap


@dataclass
class Prepared:
    """The calibrated simulation quantize() exports, and what it came from (`zeroquant inspect` measures it)."""

    graph_module: torch.fx.GraphModule  # the captured float graph
    calib: CalibSet
    sim: QuantSim
    unfolded_bn: int  # BatchNorm layers left in float
    low_bit: bool
    reconstruction: list[dict]
    timings: dict
    equalized_pairs: int = 0
    kept_depthwise: int = 0  # depthwise convs raised to --keep-depthwise bits


def prepare(loaded: LoadedModel, shape, options: QuantizeOptions, progress=None,
            calib: CalibSet | None = None) -> Prepared:
    """Capture, distil (unless `calib` is given: --budget distilled it already), build and calibrate the simulation,
    then correct biases and reconstruct as options say."""
    timings: dict = {}
    lap = stopwatch(timings)
    captured = capture(loaded.module, shape)
    lap("capture")
    if calib is None:
        calib, from_cache = distill(loaded, captured.graph_module, shape, options, progress)
        lap("distill")
        timings["distill_from_cache"] = from_cache
    folded, unfolded_bn = fold_batchnorm(captured.graph_module)
    equalized = equalize(folded) if options.equalize else 0
    sim = build_quantsim(folded, options.weight_bits, options.activation_bits, options.reduce_range)
    for name, bits in (options.layer_bits or {}).items():
        if name not in sim.layers:
            raise UsageError(f"layer_bits names an unknown layer '{name}'", f"layers: {', '.join(sim.layers)}")
        sim.layers[name].set_bits(bits)
    kept_depthwise = 0 if options.layer_bits else keep_depthwise(sim, options.keep_depthwise)  # --budget sets them
    keep_first_last(sim, options.keep_first_last)
    calibrate(sim, calib.images, options.range_method)
    lap("calibrate")
    low_bit = any(layer.bits < 8 for layer in sim.layers.values()) or any(
        q.bits < 8 for q in sim.activations.values())
    has_depthwise = any(layer.is_depthwise for layer in sim.layers.values())
    if options.bias_correction in ("on", "analytic") or (options.bias_correction == "auto" and has_depthwise):
        correct_biases(sim, calib.images, analytic=options.bias_correction == "analytic")
        lap("bias_correction")
    reconstruction = []
    if options.reconstruct == "on" or (options.reconstruct == "auto" and low_bit):
        reconstruction = reconstruct(sim, calib.images, options.effort, options.seed, progress)
        lap("reconstruct")
    return Prepared(captured.graph_module, calib, sim, unfolded_bn, low_bit, reconstruction, timings, equalized,
                    kept_depthwise)


def quantize(loaded: LoadedModel, output: str | Path, options: QuantizeOptions | None = None,
             input_shape: tuple[int, int, int] | None = None, progress=None,
             float_output: str | Path | None = None, notes: list[str] | None = None,
             calib: CalibSet | None = None) -> QuantizeReport:
    """Distil, calibrate, export and verify; write OUTPUT (.onnx) and OUTPUT.json only if every check passes.

    float_output: also write the float32 model as ONNX (the reference for `zeroquant eval --reference`).
    notes: added to the report's notes (e.g. how the mixed-precision bits were chosen).
    calib: distilled images to use instead of distilling (or loading the cached set).
    """
    options = options or QuantizeOptions()
    options.validate()
    shape = loaded.shape(input_shape)
    prepared = prepare(loaded, shape, options, progress, calib)
    return export(prepared, loaded, output, options, shape, float_output, notes)


def export(prepared: Prepared, loaded: LoadedModel, output: str | Path, options: QuantizeOptions, shape,
           float_output: str | Path | None = None, notes: list[str] | None = None) -> QuantizeReport:
    """Export the prepared simulation, verify it against onnxruntime and write the files (all or none)."""
    output = Path(output)
    sim, calib, timings, low_bit = prepared.sim, prepared.calib, prepared.timings, prepared.low_bit
    lap = stopwatch(timings)
    model = to_onnx(integer_model(sim), shape)
    packed = {f"{name}.weight" for name, layer in sim.layers.items() if options.pack_int4 and layer.bits <= 4}
    if packed:
        pack_int4(model, packed)
    lap("export")
    try:
        verify.check(model)
        check = verify.parity(model, sim, calib.images)
    except Exception as exc:
        raise VerificationError(f"the exported model failed verification: {exc}") from exc
    if check.diverged:
        raise VerificationError(
            f"onnxruntime's integer model diverges from the simulation: max logit difference "
            f"{check.max_abs_logit_diff:.3g} ({100 * check.relative_max_diff:.0f} % of the logit range), top-1 "
            f"agreement {check.top1_agreement:.1f} % on the distilled images; nothing was written")
    macs = layer_macs(sim, shape)
    census = verify.census(model, {name: f"{name}.weight" for name in sim.layers}, macs)
    lap("verify")
    data = model.SerializeToString()
    float_bytes = sum(4 * layer.weight.numel() + 4 * layer.bias.numel() for layer in sim.layers.values())
    notes = list(notes or [])
    if packed:
        notes.append(f"{len(packed)} layer(s) store INT4 weights (--pack-int4): onnxruntime has no int4 conv kernel, "
                     "so they dequantize to float and run in float (see census.float_layers)")
    if options.keep_first_last and low_bit:
        notes.append(f"the first and last layers and their inputs stay at {options.keep_first_last} bits "
                     "(--keep-first-last 0 quantizes them like the rest)")
    if prepared.kept_depthwise:
        notes.append(f"{prepared.kept_depthwise} depthwise conv(s) keep {options.keep_depthwise}-bit weights: they "
                     "hold few weights but lose the most at low bits (--keep-depthwise 0 quantizes them like the rest)")
    if options.equalize:
        notes.append(f"cross-layer equalization rescaled {prepared.equalized_pairs} conv -> ReLU -> conv pair(s) "
                     "(chains through ReLU6 are left alone: it does not commute with scaling)")
    if prepared.unfolded_bn:
        notes.append(f"{prepared.unfolded_bn} BatchNorm layer(s) do not follow a conv/linear and run in float")
    if options.reduce_range:
        notes.append("weights of non-depthwise layers use the 7-bit grid [-63, 63] inside int8 (reduce_range) so "
                     "onnxruntime's u8s8 kernels cannot saturate on CPUs without VNNI; --full-range lifts this")
    report = QuantizeReport(
        model=loaded.name,
        output=str(output),
        settings=asdict(options) | {"input_shape": list(shape), "iterations": calib.settings.get("iterations")},
        layers=[_layer_report(sim, name, macs.get(name, 0)) for name in sim.layers],
        activation_ranges={name: [round(v, 6) for v in q.range] for name, q in sim.activations.items()},
        float_ops=sim.float_ops,
        sizes={"onnx_bytes": len(data), "float32_weight_bytes": float_bytes,
               "onnx_vs_float32_weights": round(len(data) / float_bytes, 4)},
        timings=timings,
        parity=check.to_dict(),
        census=census.to_dict(),
        distillation={"method": calib.method, "images": len(calib.images), "final_bn_loss": calib.final_loss,
                      "settings": calib.settings},
        reconstruction=prepared.reconstruction,
        notes=notes,
    )
    files = [(output, data)]
    if float_output:
        files.append((Path(float_output), to_onnx(prepared.graph_module, shape).SerializeToString()))
    timings["total"] = round(sum(v for k, v in timings.items() if k != "distill_from_cache"), 3)
    files.append((output.with_suffix(output.suffix + ".json"), report.to_json().encode()))
    written = []
    try:  # all files or none: a failed or interrupted write removes the ones already written
        for path, content in files:
            write_atomic(path, content)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return report
