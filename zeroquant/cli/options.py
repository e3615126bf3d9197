"""Options that several commands share, declared once so their flags and help read the same everywhere."""

from __future__ import annotations

import typer

from zeroquant.quant.ranges import RANGE_METHODS

ARCH = typer.Option(None, "--arch", help="Zoo architecture for a state_dict/checkpoint file.")
WEIGHTS = typer.Option(None, "--weights", help="Weights file for a zoo:NAME model.")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="C,H,W when the model does not say.")
WBITS = typer.Option(8, "--wbits", help="Weight bits.")
ABITS = typer.Option(8, "--abits", help="Activation bits.")
METHOD = typer.Option("zeroq", "--method", help="Calibration images: zeroq, genie or noise.")
RANGES = typer.Option("mse", "--ranges", help=f"Activation range method: {', '.join(RANGE_METHODS)} (analytic: "
                                              "from the BN statistics; auto: the best of all, per tensor).")
IMAGES = typer.Option(32, "--images", help="Number of distilled images.")
ITERATIONS = typer.Option(None, "--iterations", help="Distillation steps (default depends on input size).")
BATCH_SIZE = typer.Option(32, "--batch-size", help="Distillation batch size.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
EFFORT = typer.Option("default", "--effort", help="Reconstruction effort: fast, default or thorough.")
FULL_RANGE = typer.Option(False, "--full-range", help="Full int8 weight grid (CPUs with VNNI only).")
TRUST_PICKLE = typer.Option(False, "--trust-pickle", help="Allow a pickled nn.Module (runs its code).")
KEEP_DEPTHWISE = typer.Option(8, "--keep-depthwise", help="Least weight bits of depthwise convs under a uniform "
                                                          "--wbits (0: treat them like the rest; --budget chooses "
                                                          "their bits).")
