"""Sony MCT's data generation (model-compression-toolkit, a peer) for a zoo model, written as a zeroquant calib.pt so
that benchmarks/data_quality.py calibrates the same quantizer on it. MCT's PyTorch defaults throughout (RAdam,
BN-alignment plus output loss, smoothing and augmentation pipeline, image clipping), with the image normalisation
that matches the model's preprocessing; the number of iterations is the knob the benchmark sets to compare at the
same CPU time. Runs in its own process so MCT never enters zeroquant's environment.

    python benchmarks/mct_images.py efficientnet_lite0 32 out.pt --iterations 100
"""

from __future__ import annotations

import argparse
import time

import torch

import model_compression_toolkit as mct
from model_compression_toolkit.data_generation import ImageNormalizationType
from model_compression_toolkit.data_generation.pytorch.image_pipeline import image_normalization_dict
from zeroquant.calib.calibset import CalibSet
from zeroquant.zoo.loading import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("count", type=int)
    parser.add_argument("output")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    loaded = resolve_model(f"zoo:{args.model}", None, None, False)
    # MCT knows a fixed mean/std table per ImageNormalizationType, and versions differ in which (2.1 has no Keras
    # table for PyTorch): its torchvision entry carries the model's own preprocessing, so the pixel range is exact
    normalisation = ImageNormalizationType.TORCHVISION
    image_normalization_dict[normalisation] = [list(loaded.preprocessing.mean), list(loaded.preprocessing.std)]
    config = mct.data_generation.get_pytorch_data_generation_config(
        n_iter=args.iterations, data_gen_batch_size=args.batch_size, image_normalization_type=normalisation)
    torch.manual_seed(args.seed)
    clock = time.perf_counter()
    rows, cols = loaded.shape(None)[1:]
    if rows != cols:
        raise SystemExit(f"MCT's data generation makes square images only; {args.model} takes {rows}x{cols}")
    images = mct.data_generation.pytorch_data_generation_experimental(loaded.module.eval(), args.count, rows, config)
    seconds = time.perf_counter() - clock
    calib = CalibSet(torch.cat(images).float().cpu(), "mct",
                     {"iterations": args.iterations, "seconds": seconds,
                      "normalisation": image_normalization_dict[normalisation]})
    with open(args.output, "wb") as file:
        file.write(calib.to_bytes())


if __name__ == "__main__":
    main()
