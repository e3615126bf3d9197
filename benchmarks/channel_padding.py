"""Channel padding (zeroquant/export/channel_padding.py) and multiplier convs (export/multiplier_convs.py),
measured: onnxruntime's integer conv kernels by channel count and group form, then narrow timm nets quantized with
and without padding, timed interleaved against FP32.

    python benchmarks/channel_padding.py [--models timm:repghostnet_050,...] [--threads 1] [--seconds 6]

Kernel times are onnxruntime's profiler medians (one thread) of one QDQ conv; model latency is the median of batch-1
runs. The padded and unpadded files must give identical outputs (checked on 8 random images).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import zeroquant
from zeroquant.evaluate.latency import measure
from zeroquant.export.channel_padding import pad_channels, pad_image_channels
from zeroquant.runtime import run_all, session

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from coverage import DISTILL, build  # noqa: E402  (sibling scripts, not a package)
from results_file import bench_log, provenance, provenance_lines, write_section  # noqa: E402

MODELS = ["timm:repghostnet_050", "timm:lcnet_050", "timm:mobilenetv3_small_100", "timm:mixnet_s",
          "timm:mnasnet_100", "timm:tinynet_e", "timm:rexnet_100", "timm:ghostnet_100", "timm:regnety_002",
          "timm:efficientnet_b0"]
DEPTHWISE = [8, 12, 16, 20, 24, 32, 40, 48]
POINTWISE = [8, 12, 16, 20, 32]
STEM = [(3, 16), (4, 16), (3, 32), (4, 32)]


def qdq_conv(cin: int, cout: int, size: int, kernel: int, stride: int, group: int) -> bytes:
    """One conv as zeroquant writes it: uint8 activations, int8 per-channel weights."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z"),
             numpy_helper.from_array(rng.integers(-127, 128, (cout, cin // group, kernel, kernel)).astype(np.int8),
                                     "w"),
             numpy_helper.from_array(np.full(cout, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(cout, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["x", "wd"], ["y"], group=group, kernel_shape=[kernel, kernel],
                              pads=[kernel // 2] * 4, strides=[stride, stride]),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            [1, cin, size, size])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def kernel_us(model: bytes, runs: int = 200) -> float:
    """Median QLinearConv time in onnxruntime's profiler, one thread."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.enable_profiling = 1, True
        options.profile_file_prefix, options.log_severity_level = str(Path(tmp) / "profile"), 3
        loaded = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        shape = [d.dim_value for d in onnx.load_from_string(model).graph.input[0].type.tensor_type.shape.dim]
        feed = {"input": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        for _ in range(runs):
            loaded.run(None, feed)
        events = json.loads(Path(loaded.end_profiling()).read_text())
    return float(np.median([e["dur"] for e in events if e.get("cat") == "Node" and
                            e["args"].get("op_name") == "QLinearConv" and e["name"].endswith("_kernel_time")]))


def kernels() -> dict:
    return {"depthwise_3x3_56px": {c: kernel_us(qdq_conv(c, c, 56, 3, 1, c)) for c in DEPTHWISE},
            "pointwise_24_in_56px": {c: kernel_us(qdq_conv(24, c, 56, 1, 1, 1)) for c in POINTWISE},
            "stem_3x3_s2_224px": {f"{cin}->{cout}": kernel_us(qdq_conv(cin, cout, 224, 3, 2, 1))
                                  for cin, cout in STEM},
            "7x7_s2_56px_48->96": {"groups 48 (multiplier 2)": kernel_us(qdq_conv(48, 96, 56, 7, 2, 48)),
                                   "depthwise over 96 repeated": kernel_us(qdq_conv(96, 96, 56, 7, 2, 96))}}


def run_model(name: str, args, workdir: Path, log) -> dict:
    log(f"{name}: quantize with and without padding")
    model = build(name, 224)
    paths = {"FP32": workdir / f"{name}-fp32.onnx", "unpadded": workdir / f"{name}-unpadded.onnx",
             "padded": workdir / f"{name}-padded.onnx"}
    padded = zeroquant.quantize(model, paths["padded"], input_shape=(3, 224, 224), float_output=paths["FP32"],
                                cache=False, **DISTILL)
    zeroquant.quantize(model, paths["unpadded"], input_shape=(3, 224, 224), cache=False, pad_channels=False,
                       **DISTILL)
    x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    same = bool(np.array_equal(run_all(session(paths["padded"]), x)[0], run_all(session(paths["unpadded"]), x)[0]))
    log(f"{name}: latency, interleaved")
    order = list(paths)
    latency = dict(zip(order, measure([paths[v] for v in order], 1, args.threads, seconds=args.seconds)))
    ms = {v: latency[v].median_ms for v in order}
    unpadded = onnx.load(paths["unpadded"])  # what the export pads, counted on the file it did not pad
    groups, image = pad_channels(unpadded), pad_image_channels(unpadded)
    return {"model": name, "latency_ms": {v: round(m, 3) for v, m in ms.items()}, "identical_outputs": same,
            "groups": groups, "image_channels": image, "notes": padded.report.notes}


def markdown(results: dict) -> str:
    lines = ["## Channel padding and multiplier convs: onnxruntime's integer convs by channel count and group form, "
             "and narrow nets padded", "",
             *provenance_lines(results), "",
             "Kernel time of one uint8 QLinearConv (onnxruntime's profiler, median of 200 runs, 1 thread), by channel "
             "count or group form:", ""]
    for kind, times in results["kernels"].items():
        lines += [f"| {kind} | " + " | ".join(str(k) for k in times) + " |",
                  "|---|" + "--:|" * len(times),
                  "| us | " + " | ".join(f"{t:.0f}" for t in times.values()) + " |", ""]
    lines += ["Narrow timm nets (random weights, BN from 3 train-mode passes, W8A8, short distillation), quantized "
              "with the default padding and with `pad_channels=False`; batch-1 latency, FP32 / unpadded / padded "
              f"interleaved run by run ({results['threads']} thread(s)):", "",
              "| model | groups padded to x16 | image channels added | FP32 ms | unpadded / FP32 | padded / FP32 | "
              "padded / unpadded | outputs identical |",
              "|---|--:|--:|--:|--:|--:|--:|:-:|"]
    for r in results["rows"]:
        ms = r["latency_ms"]
        lines.append(f"| {r['model']} | {r['groups']} | {r['image_channels']} | {ms['FP32']:.2f} | {ms['unpadded'] / ms['FP32']:.2f} | "
                     f"{ms['padded'] / ms['FP32']:.2f} | {ms['padded'] / ms['unpadded']:.2f} | "
                     f"{'yes' if r['identical_outputs'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm:NAME")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing per model (all three variants)")
    parser.add_argument("--workdir", type=Path, default=HERE.parent / "out" / "channel_padding")
    parser.add_argument("--output", type=Path, default=HERE)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = bench_log(None)
    results = provenance() | {"threads": args.threads, "rows": []}
    start = time.perf_counter()
    log("kernels by channel count")
    results["kernels"] = kernels()
    for name in [n.strip() for n in args.models.split(",")]:
        results["rows"].append(run_model(name, args, args.workdir, log))
        results["wall_s"] = round(time.perf_counter() - start, 1)
        (args.output / "channel_padding.json").write_text(json.dumps(results, indent=1) + "\n")
        write_section(args.output / "RESULTS.md", "channel padding", markdown(results))
    log(f"wrote {args.output / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
