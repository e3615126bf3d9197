"""onnxruntime CPU latency of ONNX models, measured interleaved so that load from other processes hits every model
alike, and where the time goes by layer kind (onnxruntime's profiler)."""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from zeroquant.errors import UsageError
from zeroquant.census import CONV_KERNELS, FLOAT_KERNELS, WEIGHT_INPUT
from zeroquant.progress import Progress
from zeroquant.runtime import image_input
from zeroquant.runtime import session as open_session


@dataclass
class Latency:
    path: str
    runs: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    images_per_s: float  # batch / median

    def to_dict(self) -> dict:
        return asdict(self)


def random_feed(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Gaussian noise for a model with one float input of static shape apart from (possibly) the batch."""
    name, shape = image_input(session)
    if not all(isinstance(d, int) for d in shape[1:]):
        raise UsageError(f"input '{name}' has symbolic dimensions {shape}; bench needs a static image size")
    if isinstance(shape[0], int) and shape[0] != batch:
        raise UsageError(f"input '{name}' has a fixed batch of {shape[0]}", f"pass --batch {shape[0]}")
    return {name: np.random.default_rng(0).standard_normal((batch, *shape[1:]), dtype=np.float32)}


def measure(paths: list[str | Path], batch: int = 1, threads: int | None = None, runs: int | None = None,
            warmup: int = 5, seconds: float = 10.0, progress=None) -> list[Latency]:
    """Time every model run by run in rounds (the starting model rotates), after `warmup` rounds.

    runs=None picks enough rounds for about `seconds` of timing (30 to 1000), from the warm-up rounds' median.
    """
    # idle workers must sleep: spinning workers of one session steal the cores the next interleaved session runs on
    # (measured: +28 % on ResNet-20 with 2 threads)
    sessions = [open_session(p, threads, spinning=False) for p in paths]
    feeds = [random_feed(s, batch) for s in sessions]

    def one_round(k: int) -> np.ndarray:
        elapsed = np.empty(len(sessions))
        for j in range(len(sessions)):
            i = (k + j) % len(sessions)
            start = time.perf_counter()
            sessions[i].run(None, feeds[i])
            elapsed[i] = time.perf_counter() - start
        return elapsed

    warm = [one_round(k).sum() for k in range(max(warmup, 1))]
    if runs is None:
        runs = int(np.clip(seconds / np.median(warm), 30, 1000))
    times = []
    with Progress(progress).stage(f"latency ({len(paths)} models)", total=runs) as advance:
        for k in range(runs):
            times.append(one_round(k))
            advance()
    ms = 1e3 * np.array(times)
    return [Latency(str(p), runs, float(np.median(t)), float(np.percentile(t, 90)), float(t.mean()), float(t.min()),
                    1e3 * batch / float(np.median(t))) for p, t in zip(paths, ms.T)]


@dataclass
class KindTime:
    kind: str  # "depthwise 3x3", "pointwise 1x1", "dense conv 3x3", "fully connected", or an op type
    layers: int  # nodes of this kind in onnxruntime's optimised graph
    ms: float  # summed per-node median kernel time per run

    def to_dict(self) -> dict:
        return asdict(self)


def time_by_kind(path: str | Path, batch: int = 1, threads: int | None = None, runs: int = 50) -> list[KindTime]:
    """Where a model's time goes: onnxruntime's profiler times every kernel of its optimised graph, and the nodes
    are grouped by layer kind (read from that graph's weights and group attribute), slowest kind first.

    This is what explains a latency ratio: on CPUs without VNNI, for example, int8 depthwise kernels are slower
    than onnxruntime's float ones while int8 pointwise kernels are faster.
    """
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        options.optimized_model_filepath = str(Path(folder) / "optimised.onnx")
        session = open_session(path, threads, options=options)
        feed = random_feed(session, batch)
        warmup = min(5, runs)
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        kinds = _layer_kinds(onnx.load(options.optimized_model_filepath))
    durations = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            durations[kinds.get(node) or event["args"]["op_name"], node].append(event["dur"])
    totals, counts = defaultdict(float), defaultdict(int)
    for (kind, _), times in durations.items():
        totals[kind] += float(np.median(times[warmup:])) / 1e3
        counts[kind] += 1
    return sorted((KindTime(k, counts[k], round(totals[k], 4)) for k in totals), key=lambda t: -t.ms)


def _layer_kinds(optimised: onnx.ModelProto) -> dict[str, str]:
    """Node name -> layer kind for the convolutions and matrix products of onnxruntime's optimised graph."""
    weights = {i.name: list(i.dims) for i in optimised.graph.initializer}
    kinds = {}
    for node in optimised.graph.node:
        index = WEIGHT_INPUT.get(node.op_type, 1)
        if node.op_type in FLOAT_KERNELS - CONV_KERNELS or node.op_type in {"QGemm", "QLinearMatMul", "MatMulInteger"}:
            kinds[node.name] = "fully connected"
        elif node.op_type in CONV_KERNELS and index < len(node.input) and len(weights.get(node.input[index], [])) == 4:
            _, in_per_group, kh, kw = weights[node.input[index]]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1:
                kinds[node.name] = f"depthwise {kh}x{kw}" if in_per_group == 1 else f"grouped conv {kh}x{kw}"
            else:
                kinds[node.name] = "pointwise 1x1" if kh == kw == 1 else f"dense conv {kh}x{kw}"
    return kinds


def kind_rows(profiles: list[list[dict]]) -> list[tuple[str, list[float | None]]]:
    """Side by side: (label, ms per model or None) for every layer kind any model has, in order of first
    appearance, labelled with its layer count, then an "all kernels" total row."""
    times = [{k["kind"]: k for k in kinds} for kinds in profiles]
    layers = {kind: k["layers"] for by_kind in reversed(times) for kind, k in by_kind.items()}
    rows = [(f"{kind} ({layers[kind]})", [by_kind[kind]["ms"] if kind in by_kind else None for by_kind in times])
            for kind in dict.fromkeys(kind for by_kind in times for kind in by_kind)]
    return rows + [("all kernels", [sum(k["ms"] for k in by_kind.values()) for by_kind in times])]
