"""Flags that several commands share, declared once so their names and help read the same everywhere. Each flag is
named after the QuantizeOptions field it sets."""

from __future__ import annotations

import typer

from zeroquant.quant.ranges import RANGE_METHODS

DEFAULT_MODEL = "zoo:efficientnet_lite0"
MODEL_HELP = ("torch.export archive, checkpoint/state_dict (with --arch), zoo:NAME, or a pickled module "
              "(with --trust-pickle)")

MODEL = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP)
ARCH = typer.Option(None, "--arch", help="Zoo architecture for a state_dict/checkpoint file.")
WEIGHTS = typer.Option(None, "--weights", help="Weights file for a zoo:NAME model.")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="C,H,W when the model does not say.")
INPUT_RANGE = typer.Option(None, "--input-range", help="LOW,HIGH: the range your preprocessing gives the model's "
                                                        "input, e.g. -1,1 (default: a zoo entry's, else estimated "
                                                        "from the first conv + BN).")
WBITS = typer.Option(8, "--wbits", help="Weight bits.")
ABITS = typer.Option(8, "--abits", help="Activation bits.")
METHOD = typer.Option("inversion", "--method", help="Calibration images: inversion, zeroq, genie or noise.")
RANGES = typer.Option("mse", "--ranges", help=f"Activation range method: {', '.join(RANGE_METHODS)} (analytic: "
                                              "from the BN statistics; auto: the best of all, per tensor).")
IMAGES = typer.Option(32, "--images", help="Number of distilled images.")
ITERATIONS = typer.Option(None, "--iterations", help="Distillation steps (default depends on input size).")
BATCH_SIZE = typer.Option(32, "--batch-size", help="Distillation batch size.")
LR = typer.Option(0.2, "--lr", help="Distillation learning rate.")
SEED = typer.Option(0, "--seed", help="Random seed; the same seed gives the same ONNX bytes.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
KEEP_FIRST_LAST = typer.Option(8, "--keep-first-last", help="Bits of the first and last layer and their inputs "
                                                            "(0: treat them like the rest).")
KEEP_DEPTHWISE = typer.Option(8, "--keep-depthwise", help="Least weight bits of depthwise convs under a uniform "
                                                          "--wbits (0: treat them like the rest; --budget chooses "
                                                          "their bits).")
RECONSTRUCT = typer.Option("auto", "--reconstruct", help="Block reconstruction (learned rounding and step sizes): "
                                                         "auto (below 8 bits), on or off.")
ROUNDING = typer.Option("auto", "--rounding", help="Weight rounding: gptq (second-order: each weight's error "
                                                     "compensated by the others, per layer), nearest, or auto "
                                                     "(gptq below 8 bits, nearest at 8: see the ablation).")
EFFORT = typer.Option("default", "--effort", help="Reconstruction effort: fast, default or thorough.")
TARGET_CPU = typer.Option("auto", "--target-cpu", help="The CPU the file runs on: int32-dot (x86 VNNI or AMX, ARM dot "
                                                      "product): full int8 weights; portable: 7-bit weights, safe "
                                                      "on AVX2 / AVX-512 without VNNI too; auto: as this CPU.")
NO_CACHE = typer.Option(False, "--no-cache", help="Distil (and measure sensitivity) again even if cached.")
TRUST_PICKLE = typer.Option(False, "--trust-pickle", help="Allow a pickled nn.Module (runs its code).")
WBITS_CHOICES = typer.Option("2,3,4,5,6,8", "--wbits-choices", help="Candidate weight bits per layer (--budget).")
OBJECTIVE = typer.Option("size", "--objective", help="Cost axis of the frontier: size (packed weight bits) or bops.")
WORKERS = typer.Option(1, "--workers", help="Local processes to share the work (gloo on CPU); the same file as 1. "
                                            "Several GPUs or machines: torchrun ... -m zeroquant instead.")
JSON = typer.Option(False, "--json", help="Print the result as JSON.")


def parse_range(text: str | None) -> tuple[float, float] | None:
    from zeroquant.errors import UsageError

    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"--input-range must be LOW,HIGH, got '{text}'") from exc
    return low, high


def parse_choices(text: str) -> tuple[int, ...]:
    from zeroquant.errors import UsageError

    try:
        choices = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        choices = ()
    if not choices:
        raise UsageError(f"--wbits-choices must be a comma-separated list of bit-widths from 2 to 8, got '{text}'")
    return choices
