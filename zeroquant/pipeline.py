"""The orchestrator: the one place that runs the stages in order (load, capture, distil, search, calibrate,
reconstruct, export, verify, write). `zeroquant.quantize`, `zeroquant.pareto`, `zeroquant.distill` and
`zeroquant.inspect` are these functions; the CLI only parses flags into them and prints what they return.

Arrows go one way: this module calls calib, search, quant, export and evaluate; none of them imports it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch

from zeroquant import calib as calibration_sets
from zeroquant.calib import CalibSet, DistillSettings
from zeroquant.calib.preview import check_channels, grid_png
from zeroquant.census import census as layer_census
from zeroquant.cpu import WEIGHT_GRID, grid_warning
from zeroquant.device import resolve_device
from zeroquant.distributed import Workers, current
from zeroquant.errors import UsageError, VerificationError
from zeroquant.evaluate.inspect import quant_report
from zeroquant.export import verify
from zeroquant.export.channel_padding import pad_channels, pad_image_channels
from zeroquant.export.int4 import pack_int4
from zeroquant.export.multiplier_convs import repeat_multiplier_convs
from zeroquant.export.integer_model import integer_model
from zeroquant.export.onnx_export import to_onnx
from zeroquant.files import check_writable, write_all
from zeroquant.graph.decompose import for_quantization
from zeroquant.graph.batchnorm import input_statistics
from zeroquant.graph.capture import CapturedModel, capture
from zeroquant.options import QuantizeOptions
from zeroquant.progress import Progress
from zeroquant.quant.bias_correction import correct_biases
from zeroquant.quant.calibrate import calibrate
from zeroquant.quant.equalize import equalize
from zeroquant.quant.gptq import gptq, gptq_layers
from zeroquant.quant.plan import first_and_last, keep_depthwise, keep_first_last
from zeroquant.quant.reconstruct import reconstruct
from zeroquant.quant.sim import QuantSim, build_quantsim
from zeroquant.report import (LayerReport, QuantizeReport, QuantizeResult, depthwise_note, equalize_note,
                              first_last_note, float_op_notes, input_range_note, int4_note, multiplier_note,
                              padding_note, unfolded_bn_note)
from zeroquant.search import measure, search
from zeroquant.search.pareto import choose, spread, uniform_points
from zeroquant.search.result import ParetoResult, pareto_data
from zeroquant.search.selection import budget_candidates, closest
from zeroquant.zoo.loading import LoadedModel, resolve_model

PARETO_CHECKED = 5  # frontier points `pareto` measures end to end, besides the chosen one

@dataclass
class Job:
    """A model loaded and captured once, with the options every stage reads."""

    loaded: LoadedModel
    shape: tuple[int, int, int]
    options: QuantizeOptions
    captured: CapturedModel
    progress: Progress  # silent on every process but the first
    workers: Workers  # this process's place in a torchrun / --workers job (alone: rank 0 of 1)

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.captured.graph_module


def start(model, input_shape, options: QuantizeOptions | None, option_values: dict, arch=None, weights=None,
          trust_pickle: bool = False, outputs=(), progress=None) -> Job:
    """Validate everything that can be checked before the slow stages, then load and capture the model."""
    options = QuantizeOptions.of(options, **option_values)
    options.validate()
    workers = current(options.device)
    for path in outputs:
        if path is not None and workers.is_main:
            check_writable(path)
    progress = Progress(progress if workers.is_main else None)

    def load_and_capture():
        loaded = resolve_model(model, arch, weights, trust_pickle)
        shape = loaded.shape(_shape(input_shape))
        with progress.stage("capture"):
            return loaded, shape, capture(loaded.module, shape)

    loaded, shape, captured = workers.run(load_and_capture)  # a bad model: one error, said once for the job
    return Job(loaded, shape, options, captured, progress, workers)


def _shape(input_shape) -> tuple[int, int, int] | None:
    if input_shape is None:
        return None
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in shape):
        raise UsageError(f"input shape must be C,H,W with positive integers, got {input_shape}")
    return shape


def distill_set(job: Job, seed: int | None = None, images: int | None = None) -> tuple[CalibSet, bool]:
    """The distilled calibration set (from the cache when it was made before) and whether it came from the cache."""
    options = job.options
    settings = DistillSettings(images or options.images, options.batch_size,
                               options.iterations or calibration_sets.default_iterations(job.shape), options.lr,
                               options.seed if seed is None else seed, pixel_range(job), options.distill_precision)
    return calibration_sets.distill(job.graph_module, job.shape, options.method, settings,
                                    resolve_device(options.device), job.captured.digest, options.cache, job.progress,
                                    job.workers)


def pixel_range(job: Job) -> tuple | None:
    """What the preprocessing can produce, per channel where the zoo entry says, for distillers that keep their
    pixels inside it; None where only an estimate exists (clipping to a wrong range would hurt more than help)."""
    if job.options.input_range is not None:
        return tuple(float(v) for v in job.options.input_range)
    if job.loaded.preprocessing is not None:
        return job.loaded.preprocessing.channel_ranges()
    return None


def held_out_set(job: Job) -> CalibSet:
    """Images the search does not see, to check its choices on: half as many (distillation is the slow step),
    distilled with the next seed."""
    return distill_set(job, seed=job.options.seed + 1, images=max(1, job.options.images // 2))[0]


def _calibration(job: Job, calibration) -> tuple[CalibSet, bool]:
    """The images to calibrate on: given (a CalibSet, a tensor, or a calib.pt path) or distilled."""
    if calibration is None:
        return distill_set(job)
    if isinstance(calibration, (str, Path)):
        calibration = CalibSet.from_file(calibration)
    if isinstance(calibration, torch.Tensor):
        calibration = CalibSet(calibration.detach().float().cpu(), "given", {})
    if tuple(calibration.images.shape[1:]) != job.shape:
        raise UsageError(f"the calibration images are {tuple(calibration.images.shape[1:])}, the model takes "
                         f"{job.shape}", "distil them for this input shape")
    return calibration, False


def _search(job: Job, folded: torch.fx.GraphModule, calib: CalibSet):
    options = job.options
    return search(folded, calib.images, job.shape, options.wbits_choices, options.objective, options.abits,
                  options.reduce_range, job.captured.digest, options.cache, job.progress, job.workers,
                  options.rounding)


def input_range(job: Job) -> tuple[tuple[float, float] | None, str]:
    """The range of the model's input for its quantizer, and where it comes from: given, the zoo entry's
    preprocessing, estimated from the first conv + BN, or (None) fitted to the distilled images like the rest."""
    if job.options.input_range is not None:
        return tuple(float(v) for v in job.options.input_range), "given (--input-range)"
    if job.loaded.preprocessing is not None:
        preprocessing = job.loaded.preprocessing
        return preprocessing.input_range(), f"the {preprocessing.name} preprocessing of the zoo entry"
    stats = input_statistics(job.graph_module)
    if stats is not None:
        return stats.range(), ("estimated from the first conv + BN statistics (pass --input-range LOW,HIGH, your "
                               "preprocessing's range, if you know it)")
    return None, "fitted to the distilled images (pass --input-range LOW,HIGH, your preprocessing's range)"


@dataclass
class Prepared:
    """The calibrated simulation quantize() exports, and what it came from (`inspect` measures it)."""

    graph_module: torch.fx.GraphModule  # the captured float graph
    calib: CalibSet
    sim: QuantSim
    unfolded_bn: int  # BatchNorm layers not folded into the layer before them (depthwise 1x1 convs now)
    low_bit: bool
    reconstruction: list[dict]
    timings: dict
    notes: list[str]
    rounding: list[dict]  # per layer, GPTQ's output error against plain rounding
    layer_bits: dict[str, int]  # the per-layer weight bits asked for (layer_bits) or chosen (budget)


def stopwatch(timings: dict):
    """lap(stage) puts the seconds since the previous lap (or since this call) in timings[stage]."""
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        clock = now

    return lap


def prepare(job: Job, calibration=None) -> Prepared:
    """Distil (unless calibration images are given), choose bits for a budget, build and calibrate the simulation,
    then round, correct biases and reconstruct as the options say.

    With a budget, the frontier's choice and the uniform configuration of the same size both go through all of
    that, and the one closer to the float model on held-out distilled images is kept: the frontier is estimated
    from each layer alone, reconstruction then recovers more in some configurations than in others, and the
    measurement is what decides."""
    options = job.options
    timings: dict = {}
    lap = stopwatch(timings)
    calib, from_cache = _calibration(job, calibration)
    lap("distill")
    timings["distill_from_cache"] = from_cache
    folded, unfolded_bn = for_quantization(job.graph_module)
    equalized = equalize(folded) if options.equalize else 0
    if options.budget is None:
        prepared = _simulate(job, folded, calib, dict(options.layer_bits or {}), timings)
    else:
        found = _search(job, folded, calib)
        candidates = budget_candidates(found, options.budget_limit())
        lap("search")
        built = [_simulate(job, folded, calib, candidate.layer_bits, dict(timings)) for candidate in candidates]
        held_out = held_out_set(job).images
        with torch.no_grad():
            reference = job.graph_module(held_out)
        best, measured = closest([b.sim for b in built], candidates, held_out, reference, found, options.budget)
        prepared = built[best]
        prepared.notes.append(measured)
        prepared.notes.insert(0, candidates[0].note)  # how the frontier chose, whichever configuration was kept
        if candidates[0].warning:
            prepared.notes.insert(1, f"warning: {candidates[0].warning}")
    prepared.timings["distill_from_cache"] = from_cache
    if unfolded_bn:
        prepared.notes.append(unfolded_bn_note(unfolded_bn))
    if options.equalize:
        prepared.notes.append(equalize_note(equalized))
    prepared.unfolded_bn = unfolded_bn
    return prepared


def _simulate(job: Job, folded: torch.fx.GraphModule, calib: CalibSet, layer_bits: dict[str, int],
              timings: dict) -> Prepared:
    """The simulation of one bit allocation, calibrated, rounded, bias-corrected and reconstructed."""
    options, progress = job.options, job.progress
    lap = stopwatch(timings)
    notes: list[str] = []
    sim = build_quantsim(folded, options.wbits, options.abits, options.reduce_range)
    for name, bits in layer_bits.items():
        if name not in sim.layers:
            raise UsageError(f"layer_bits names an unknown layer '{name}'", f"layers: {', '.join(sim.layers)}")
        sim.layers[name].set_bits(bits)
    kept_depthwise = 0 if layer_bits else keep_depthwise(sim, options.keep_depthwise)  # a budget sets them
    keep_first_last(sim, options.keep_first_last, frozenset(layer_bits))
    known_range, source = input_range(job)
    with progress.stage("calibrate"):
        calibrate(sim, calib.images, options.ranges, input_range=known_range)
    lap("calibrate")
    if sim.input_quantizer is not None:
        low, high = sim.activations[sim.input_quantizer].range
        notes.append(input_range_note(low, high, source))
    weight_bits, activation_bits = sim.fewest_bits()
    low_bit = min(weight_bits, activation_bits) < 8
    rounding = []
    second_order = gptq_layers(sim, options.rounding)
    if second_order:
        rounding = gptq(sim, calib.images, second_order, progress=progress)
        lap("rounding")
    has_depthwise = any(layer.is_depthwise for layer in sim.layers.values())
    correction = options.bias_correction_source(has_depthwise)
    if correction:
        with progress.stage("bias correction"):
            correct_biases(sim, calib.images, analytic=correction == "statistics")
        lap("bias_correction")
    reconstruction = []
    if options.reconstructs(activation_bits):
        reconstruction = reconstruct(sim, calib.images, options.effort, options.seed, progress,
                                     workers=job.workers)
        lap("reconstruct")
    if options.keep_first_last and low_bit:
        given = sorted(name for name in first_and_last(sim) if layer_bits.get(name, 8) < options.keep_first_last)
        notes.append(first_last_note(options.keep_first_last, given, options.budget is not None))
    if kept_depthwise:
        notes.append(depthwise_note(kept_depthwise, options.keep_depthwise))
    return Prepared(job.graph_module, calib, sim, 0, low_bit, reconstruction, timings, notes, rounding, layer_bits)


def _layer_report(sim: QuantSim, name: str, macs: int) -> LayerReport:
    layer, feeding = sim.layers[name], sim.layer_inputs.get(name)
    quantizer = sim.activations[feeding] if feeding else None
    return LayerReport(layer.name, layer.kind, layer.bits, layer.qmax, layer.is_depthwise, macs,
                       list(quantizer.range) if quantizer else None, quantizer.bits if quantizer else None)


def export(job: Job, prepared: Prepared, output: str | Path | None, with_float: bool) -> QuantizeResult:
    """Export the prepared simulation and verify it in onnxruntime; a model that fails is a VerificationError."""
    options, sim, calib, timings = job.options, prepared.sim, prepared.calib, prepared.timings
    lap = stopwatch(timings)
    with job.progress.stage("export"):
        model = to_onnx(integer_model(sim), job.shape, job.captured.output_names)
        repeated = repeat_multiplier_convs(model)
        padded = (pad_channels(model), pad_image_channels(model)) if options.pad_channels else (0, 0)
        low = {f"{name}.weight" for name, layer in sim.layers.items() if options.pack_int4 and layer.bits <= 4}
        packed = pack_int4(model, low) if low else 0
        onnx.helper.set_model_props(model, {WEIGHT_GRID: options.weight_grid(), "zeroquant.target_cpu":
                                            options.target_cpu})
    lap("export")
    with job.progress.stage("verify"):
        verify.check(model)  # a model onnx or onnxruntime refuses is a VerificationError; anything else, a bug
        check = verify.parity(model, sim, job.graph_module, calib.images, job.captured.output_names,
                              options.parity_tolerance)
        if check.diverged:
            raise VerificationError(
                f"onnxruntime's integer model diverges from the simulation: max logit difference "
                f"{check.max_abs_logit_diff:.3g} ({100 * check.relative_max_diff:.0f} % of the logit range, above "
                f"--parity-tolerance {options.parity_tolerance:g}), top-1 agreement {check.top1_agreement:.1f} % on "
                f"the distilled images; {check.diagnosis()}; nothing was written (a higher --parity-tolerance "
                f"accepts it)")
        macs = sim.layer_macs(job.shape)
        values = {name: layer.integer_weight().to(torch.int8).numpy() for name, layer in sim.layers.items()}
        census = layer_census(model, {name: f"{name}.weight" for name in sim.layers}, macs, values)
    lap("verify")
    data = model.SerializeToString()
    float_bytes = sum(4 * layer.weight.numel() + 4 * layer.bias.numel() for layer in sim.layers.values())
    notes = list(prepared.notes)
    if check.reference_relative_max_diff is not None:  # beyond the default tolerance, accepted at the user's
        notes.append(f"warning: onnxruntime's outputs differ from the simulation's by "
                     f"{100 * check.relative_max_diff:.0f} % of the logit range, accepted at --parity-tolerance "
                     f"{options.parity_tolerance:g}; {check.diagnosis()}")
    if repeated:
        notes.append(multiplier_note(repeated))
    if any(padded):
        notes.append(padding_note(*padded))
    if packed:
        notes.append(int4_note(packed))
    notes.append(options.weight_grid_note())
    mismatch = grid_warning(options.weight_grid())
    if mismatch:
        notes.append(f"warning: {mismatch}")
    report = QuantizeReport(
        model=job.loaded.name,
        output=str(output) if output is not None else "",
        outputs=list(job.captured.output_names),
        settings=asdict(options) | {"input_shape": list(job.shape), "iterations": calib.settings.get("iterations"),
                                    "layer_bits": prepared.layer_bits or None},
        layers=[_layer_report(sim, name, macs.get(name, 0)) for name in sim.layers],
        activation_ranges={name: [round(v, 6) for v in q.range] for name, q in sim.activations.items()},
        float_ops=float_op_notes(census),
        sizes={"onnx_bytes": len(data), "float32_weight_bytes": float_bytes,
               "onnx_vs_float32_weights": round(len(data) / float_bytes, 4)},
        timings=timings,
        parity=check.to_dict(),
        census=census.to_dict(),
        distillation={"method": calib.method, "images": len(calib.images), "final_bn_loss": calib.final_loss,
                      "settings": calib.settings},
        reconstruction=prepared.reconstruction,
        rounding=prepared.rounding,
        notes=notes,
    )
    float_model = to_onnx(prepared.graph_module, job.shape, job.captured.output_names).SerializeToString() if \
        with_float else None
    timings["total"] = round(sum(v for k, v in timings.items() if k != "distill_from_cache"), 3)
    return QuantizeResult(report, data, float_model)


def quantize(model, output: str | Path | None = None, *, input_shape=None, options: QuantizeOptions | None = None,
             calibration=None, float_output: str | Path | None = None, arch: str | None = None,
             weights: str | None = None, trust_pickle: bool = False, progress=None, **option_values) -> QuantizeResult:
    """Quantize a trained CNN with no real data into a verified integer ONNX model.

    model: an nn.Module, a torch.export ExportedProgram, a model file or "zoo:NAME". input_shape: C,H,W when the model
    does not say. Options are QuantizeOptions fields as keywords (wbits=4, budget="4.5", method="genie", ...), named
    as the CLI flags are. calibration: images to use instead of distilling (a CalibSet, an N,C,H,W tensor or a
    calib.pt). output / float_output: write the ONNX file (+ its .json report) / the float32 ONNX model; files are
    written all or none, and only if verification passed. Returns the report and the ONNX bytes.
    """
    job = start(model, input_shape, options, option_values, arch, weights, trust_pickle, (output, float_output),
                progress)
    prepared = prepare(job, calibration)

    def export_and_write() -> QuantizeResult:
        result = export(job, prepared, output, float_output is not None)
        files = []
        if output is not None:
            report = result.report.to_json().encode()
            files += [(output, result.onnx), (Path(output).with_suffix(Path(output).suffix + ".json"), report)]
        if float_output is not None:
            files.append((float_output, result.float_onnx))
        with job.progress.stage("write"):
            write_all(files)
        return result

    return main_only(job, export_and_write)


def main_only(job: Job, work):
    """work() on the first process alone (export, verification and writing happen once), its result on all."""
    return job.workers.broadcast(job.workers.run(lambda: work() if job.workers.is_main else None))


def pareto(model, output: str | Path | None = None, *, input_shape=None, options: QuantizeOptions | None = None,
           arch: str | None = None, weights: str | None = None, trust_pickle: bool = False, progress=None,
           **option_values) -> ParetoResult:
    """The mixed-precision frontier: every layer's sensitivity to each of `wbits_choices` on distilled images, the
    exact size (or BOPs) frontier, and a few of its points (plus the chosen one, with `budget`) checked end to end
    on held-out distilled images. output: a folder for pareto.json and pareto.png."""
    output = Path(output) if output is not None else None
    writes = () if output is None else (output / "pareto.json" if output.is_dir() else output,)
    job = start(model, input_shape, options, option_values, arch, weights, trust_pickle, writes, progress)
    options, clock = job.options, time.perf_counter()
    calib, _ = distill_set(job)
    distilled = time.perf_counter() - clock
    found = _search(job, for_quantization(job.graph_module)[0], calib)
    problem, front = found.problem, found.front
    budget = options.budget_limit()
    cost = budget.cost(problem) if budget is not None else None
    chosen = choose(front, cost) if cost is not None else None
    checked, uniform = spread(front, PARETO_CHECKED, chosen), uniform_points(problem)
    held_out = held_out_set(job)
    with job.progress.stage("measure frontier points"):
        results = measure(found, calib.images, held_out.images, options.ranges, options.keep_first_last,
                          [front.points[i]["bits"] for i in checked] + [p["bits"] for p in uniform], options.rounding,
                          input_range(job)[0])
    for point, result in zip(uniform, results[len(checked):]):
        point["measured"] = result
    budget_data = None if cost is None else {
        "text": budget.text, **({"size_bytes": cost / 8} if problem.objective == "size" else {"bops": cost})}
    timings = {"capture_and_distill_s": round(distilled, 3)} | found.timings
    data = pareto_data(job.loaded.name, found, dict(zip(checked, results)), uniform, chosen, budget_data,
                       len(calib.images), len(held_out.images), timings)
    result = ParetoResult(data, found)
    if output is not None:
        def save() -> None:
            with job.progress.stage("write"):
                result.save(output)

        main_only(job, save)
    return result


def distill(model, output: str | Path | None = None, *, input_shape=None, options: QuantizeOptions | None = None,
            arch: str | None = None, weights: str | None = None, trust_pickle: bool = False,
            preview: str | Path | None = None, progress=None, **option_values) -> torch.Tensor:
    """The distilled calibration images (N,C,H,W, normalised as the model's input), from the cache when the same
    model and settings were distilled before. output: also write them as a calib.pt, which quantize(calibration=)
    and `zeroquant quantize --calibration` read; preview: a PNG grid of them."""
    return distill_calibration(model, output, input_shape=input_shape, options=options, arch=arch, weights=weights,
                               trust_pickle=trust_pickle, preview=preview, progress=progress,
                               **option_values)[0].images


def distill_calibration(model, output: str | Path | None = None, *, input_shape=None,
                        options: QuantizeOptions | None = None, arch: str | None = None, weights: str | None = None,
                        trust_pickle: bool = False, preview: str | Path | None = None, progress=None,
                        **option_values) -> tuple[CalibSet, Job, bool]:
    """distill(), returning the whole set (images, final BN loss per layer), the job and whether it was cached."""
    job = start(model, input_shape, options, option_values, arch, weights, trust_pickle, (output, preview), progress)
    if preview is not None:  # checked before distilling, which can take minutes
        check_channels(job.shape[0])
    calib, cached = distill_set(job)
    files = [] if output is None else [(output, calib.to_bytes())]
    if preview is not None:
        prep = job.loaded.preprocessing
        files.append((preview, grid_png(calib.images, prep and prep.mean, prep and prep.std)))
    main_only(job, lambda: write_all(files))
    return calib, job, cached


def inspect(model, *, input_shape=None, options: QuantizeOptions | None = None, top: int | None = None,
            arch: str | None = None, weights: str | None = None, trust_pickle: bool = False, progress=None,
            **option_values) -> dict:
    """Where quantization loses accuracy: per-layer SQNR of what quantize() would export against the float model on
    the distilled images (worst first, the `top` worst), and the BN statistics the distilled images still miss."""
    job = start(model, input_shape, options, option_values, arch, weights, trust_pickle, (), progress)
    prepared = prepare(job)
    with job.progress.stage("measure SQNR"):
        report = quant_report(prepared.graph_module, prepared.sim, prepared.calib, top)
    report["distillation"]["from_cache"] = prepared.timings.get("distill_from_cache", False)
    return {"model": job.loaded.name} | report
