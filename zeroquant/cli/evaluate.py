"""`zeroquant eval`: accuracy of an ONNX model on an image folder, and agreement with a reference model."""

from __future__ import annotations

from pathlib import Path

import typer

from zeroquant.cli.output import key_value_table, print_json, stdout, warn


def evaluate(
    model: Path = typer.Argument(..., help="ONNX model to evaluate."),
    data: Path = typer.Option(None, "--data", help="Image folder (default: the zoo entry's evaluation set)."),
    zoo: str = typer.Option(None, "--zoo", help="Zoo model whose preprocessing (and dataset) to use."),
    preprocess: str = typer.Option(None, "--preprocess", help="Preprocessing name from models.yaml."),
    labels: str = typer.Option("folders", "--labels", help="'folders', a wnids.txt path, or 'none'."),
    reference: Path = typer.Option(None, "--reference", help="Reference ONNX (e.g. FP32) for agreement."),
    limit: int = typer.Option(None, "--limit", help="Evaluate a class-balanced subset of N images."),
    threads: int = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Top-1/top-5 of an ONNX model on labelled images, and agreement with a reference model."""
    from zeroquant.errors import UsageError
    from zeroquant.evaluate.accuracy import evaluate_onnx, require_classifier
    from zeroquant.runtime import session, weight_grid_warning
    from zeroquant.evaluate.datasets import dataset_for_zoo, load_image_folder
    from zeroquant.zoo.registry import preprocessing, zoo_entry

    if (zoo is None) == (preprocess is None):
        raise UsageError("give exactly one of --zoo NAME or --preprocess NAME")
    require_classifier(session(model, threads), model)  # before minutes of image loading
    warn(weight_grid_warning(model))
    if data is None:
        if zoo is None:
            raise UsageError("--data is needed with --preprocess")
        images = dataset_for_zoo(zoo, limit)
    else:
        prep = zoo_entry(zoo).preprocessing if zoo else preprocessing(preprocess)
        images = load_image_folder(data, prep, None if labels == "none" else labels, limit)
    result = evaluate_onnx(model, images, reference, threads=threads)
    if json_out:
        print_json({"model": str(model), "reference": str(reference) if reference else None} | result.to_dict())
        return
    rows = [("images", str(result.n)), ("top-1", f"{result.top1:.2f} %"), ("top-5", f"{result.top5:.2f} %")]
    if result.agreement is not None:
        rows.append(("agreement with reference", f"{result.agreement:.2f} %"))
    rows.append(("throughput", f"{result.images_per_s:.0f} images/s"))
    stdout.print(key_value_table(f"zeroquant eval: {model}", rows))
