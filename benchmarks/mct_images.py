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
from zeroquant.calib.base import CalibSet
from zeroquant.zoo.loading import resolve_model

# MCT normalises with one of three fixed tables: the one nearest the zoo entry's mean/std (x 255)
NORMALISATIONS = {ImageNormalizationType.TORCHVISION: (0.485, 0.456, 0.406),
                  ImageNormalizationType.KERAS_APPLICATIONS: (0.5, 0.5, 0.5)}


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
    mean = loaded.preprocessing.mean
    normalisation = min(NORMALISATIONS, key=lambda k: sum(abs(a - b) for a, b in zip(NORMALISATIONS[k], mean)))
    config = mct.data_generation.get_pytorch_data_generation_config(
        n_iter=args.iterations, data_gen_batch_size=args.batch_size, image_normalization_type=normalisation)
    torch.manual_seed(args.seed)
    clock = time.perf_counter()
    images = mct.data_generation.pytorch_data_generation_experimental(
        loaded.module.eval(), args.count, loaded.shape(None)[1:], config)
    seconds = time.perf_counter() - clock
    calib = CalibSet(torch.cat(images).float().cpu(), "mct",
                     {"iterations": args.iterations, "seconds": seconds, "normalisation": normalisation.value})
    with open(args.output, "wb") as file:
        file.write(calib.to_bytes())


if __name__ == "__main__":
    main()
