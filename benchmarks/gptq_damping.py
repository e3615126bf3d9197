"""How GPTQ is regularised at 32 images: its damping, and what it does with layers it thinks are poorly sampled.

Runs the default low-bit quantizer (everything as `zeroquant quantize zoo:MODEL --wbits 4` and any --abits / option
given) on the distilled images of each seed (from ZEROQUANT_CACHE: the default command's own images), changing only
GPTQ's regularisation, and scores the simulation on the zoo's evaluation images. One JSON line per run: top-1, drop,
agreement and KL to FP32, on all the images and on their odd-indexed half (the data-quality ruler's photos for Lite0).

Variants: `damping=X` (of the mean H diagonal, added to H before GPTQ's factorisation; the code's value is
gptq.DAMPING), `damping=adaptive:C` (per layer, C x columns / input vectors: more where H is poorly sampled, at least
the code's value), `poor=diag|shrink|full` (layers below gptq.MIN_SAMPLES_PER_COLUMN, today left to nearest rounding,
are instead rounded with H's off-diagonal terms dropped, shrunk towards its diagonal by 1 - samples / (2 columns), or
kept whole).

    python benchmarks/gptq_damping.py --model efficientnet_lite0 --seeds 0,1,2,3 --variants default,damping=1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from zeroquant.evaluate.accuracy import evaluate_logits
from zeroquant.evaluate.datasets import dataset_for_zoo
from zeroquant.options import QuantizeOptions
from zeroquant.pipeline import distill_set, prepare, start
from zeroquant.quant import gptq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_quality import fidelity, logits_of  # noqa: E402  (a sibling script)

ROUND_LAYER, DAMPING = gptq.round_layer, gptq.DAMPING


def regularised(variant: str):
    """gptq.round_layer with the variant's regularisation."""
    kind, _, value = variant.partition("=")

    def round_layer(layer, inputs, search_scales=True):
        gptq.DAMPING = DAMPING
        columns = inputs.matrix.shape[-1]
        if kind == "damping":
            scale, _, factor = value.partition(":")
            gptq.DAMPING = max(DAMPING, float(factor) * columns / inputs.samples) if scale == "adaptive" \
                else float(value)
        if kind == "poor" and not inputs.well_sampled:
            shrink = {"diag": 1.0, "full": 0.0, "shrink": max(0.0, 1 - inputs.samples / (2 * columns))}[value]
            diagonal = torch.diag_embed(torch.diagonal(inputs.matrix, dim1=1, dim2=2))
            matrix = (1 - shrink) * inputs.matrix + shrink * diagonal
            passing = int(gptq.MIN_SAMPLES_PER_COLUMN * columns) + 1  # passes round_layer's sampling check
            inputs = gptq.InputHessian(matrix, passing, inputs.target)
        return ROUND_LAYER(layer, inputs, search_scales)

    return round_layer


def scores(logits: torch.Tensor, reference: torch.Tensor, labels) -> list[float]:
    """[top-1, drop against FP32, agreement, KL]."""
    measured = fidelity(logits, reference, labels)
    fp32 = evaluate_logits(reference.numpy(), labels)[0]
    return [measured["top1"], round(fp32 - measured["top1"], 2), measured["agreement"], measured["kl"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0])
    parser.add_argument("--variants", default="default,damping=1")
    parser.add_argument("--abits", type=int, default=8)
    parser.add_argument("--reconstruct", default="auto")
    args = parser.parse_args()
    data = dataset_for_zoo(args.model)
    options = QuantizeOptions(wbits=4, abits=args.abits, reconstruct=args.reconstruct)
    captured = start(f"zoo:{args.model}", None, options, {})
    reference = logits_of(captured.graph_module, data.images)
    for seed in args.seeds:
        job = dataclasses.replace(captured, options=dataclasses.replace(options, seed=seed))
        images = distill_set(job)[0]
        for variant in args.variants.split(","):
            gptq.round_layer = regularised(variant)
            clock = time.perf_counter()
            logits = logits_of(prepare(job, images).sim, data.images)
            odd = slice(1, None, 2)
            print(json.dumps({"model": args.model, "abits": args.abits, "reconstruct": args.reconstruct,
                              "seed": seed, "variant": variant, "seconds": round(time.perf_counter() - clock),
                              "all": scores(logits, reference, data.labels),
                              "odd": scores(logits[odd], reference[odd], data.labels[odd])}), flush=True)
        gptq.round_layer, gptq.DAMPING = ROUND_LAYER, DAMPING


if __name__ == "__main__":
    main()
