"""Image-folder loading and ONNX accuracy evaluation, on tiny generated folders and the shared CIFAR-10 images."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zeroquant.errors import ModelLoadError, UsageError
from zeroquant.evaluate.accuracy import evaluate_logits, evaluate_onnx
from zeroquant.runtime import predict, session
from zeroquant.evaluate.datasets import dataset_for_zoo, load_image_folder
from zeroquant.zoo.registry import Preprocessing

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PREP = Preprocessing("test", resize=32, crop=28, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _write(path: Path, color, mode="RGB", size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folders(tmp_path):
    """Two classes: 'b_dog' gets 2 images, 'a_cat' 3, one of them grayscale; a stray text file is ignored."""
    for i, c in enumerate([(255, 0, 128), (10, 200, 30), (40, 40, 250)]):
        _write(tmp_path / "a_cat" / f"{i}.png", c)
    _write(tmp_path / "a_cat" / "3.png", 77, mode="L")
    for i, c in enumerate([(0, 0, 0), (200, 100, 0)]):
        _write(tmp_path / "b_dog" / f"{i}.jpg", c)
    (tmp_path / "b_dog" / "notes.txt").write_text("not an image")
    return tmp_path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 7)
    ).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but 30x faster than dynamo here
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 28, 28),), path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return model, path


def test_folders_labels_order_and_preprocessing(folders):
    data = load_image_folder(folders, PREP)
    assert data.images.shape == (6, 3, 28, 28) and data.images.dtype == np.float32
    assert data.labels.tolist() == [0, 0, 0, 0, 1, 1] and data.labels.dtype == np.int64
    assert [Path(p).name for p in data.paths] == ["0.png", "1.png", "2.png", "3.png", "0.jpg", "1.jpg"]
    # (255, 0, 128) scaled to [0,1] then (x - 0.5) / 0.5; grayscale 77 is replicated over RGB
    np.testing.assert_allclose(data.images[0, :, 5, 5], [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-6)
    np.testing.assert_allclose(data.images[3, :, 0, 0], [77 / 255 * 2 - 1] * 3, atol=1e-6)


def test_limit_is_class_balanced(folders):
    data = load_image_folder(folders, PREP, limit=4)
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert [Path(p).name for p in data.paths] == ["0.png", "1.png", "0.jpg", "1.jpg"]
    assert load_image_folder(folders, PREP, limit=5).labels.tolist() == [0, 0, 0, 1, 1]


def test_wnids_and_unlabelled(tmp_path):
    wnids = tmp_path / "wnids.txt"
    wnids.write_text("n001\nn002\nn003\n")
    _write(tmp_path / "img" / "n003_cat.JPEG", (1, 2, 3))
    _write(tmp_path / "img" / "n001_dog_big.JPEG", (1, 2, 3))
    data = load_image_folder(tmp_path / "img", PREP, labels=wnids)
    assert data.labels.tolist() == [0, 2]
    assert load_image_folder(tmp_path / "img", PREP, labels=None).labels.tolist() == [-1, -1]
    _write(tmp_path / "img" / "n999_x.JPEG", (1, 2, 3))
    with pytest.raises(UsageError, match="n999"):
        load_image_folder(tmp_path / "img", PREP, labels=wnids)


def test_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_image_folder(tmp_path / "missing", PREP)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(UsageError, match="no images"):
        load_image_folder(tmp_path, PREP)


def test_evaluate_logits_by_hand():
    logits = np.array([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],  # top-1 = 1, right
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],  # tie: class 0 ranks first; label 1 is still in the top 5
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # ties among 1..6: stable order gives top 5 = 0,1,2,3,4; label 6 misses
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0],  # unlabelled: not in accuracy, but in agreement
    ], dtype=np.float32)
    labels = np.array([1, 1, 6, -1])
    reference = np.array([[0, 1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
    top1, top5, agreement = evaluate_logits(logits, labels, reference)
    assert top1 == pytest.approx(100 / 3) and top5 == pytest.approx(200 / 3) and agreement == 50.0
    assert evaluate_logits(logits, labels)[2] is None
    top1, _, _ = evaluate_logits(logits, np.full(4, -1))
    assert np.isnan(top1)


def test_evaluate_onnx_matches_torch(folders, model_path):
    model, path = model_path
    data = load_image_folder(folders, PREP)
    with torch.no_grad():
        expected = model(torch.from_numpy(data.images)).numpy()
    np.testing.assert_allclose(predict(session(path), data.images, batch_size=4), expected, atol=1e-5)
    result = evaluate_onnx(path, data, reference_path=path, batch_size=4, threads=1)
    assert result.n == 6 and result.agreement == 100.0 and result.images_per_s > 0
    assert result.top1 == pytest.approx(100.0 * (expected.argmax(1) == data.labels).mean())
    assert result.top5 == pytest.approx(100.0 * (np.argsort(-expected, 1)[:, :5] == data.labels[:, None]).any(1).mean())
    assert set(result.to_dict()) == {"n", "top1", "top5", "agreement", "images_per_s"}


def test_fixed_batch_model_and_mismatches(tmp_path, folders, model_path):
    model, _ = model_path
    fixed = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(4, 3, 28, 28),), fixed, dynamo=False, input_names=["x"])
    data = load_image_folder(folders, PREP)  # 6 images: one full batch of 4, one padded batch of 2
    with torch.no_grad():
        expected = model(torch.from_numpy(data.images)).numpy()
    np.testing.assert_allclose(predict(session(fixed), data.images), expected, atol=1e-5)
    with pytest.raises(UsageError, match=r"'x' expects shape \[4, 3, 28, 28\]"):
        predict(session(fixed), np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ModelLoadError):
        session(tmp_path / "missing.onnx")


@pytest.mark.skipif(not (SHARED / "data/cifar10/test").is_dir(), reason="shared CIFAR-10 images not present")
def test_cifar10_subset_is_balanced():
    data = dataset_for_zoo("resnet20_cifar10", limit=50)
    assert data.images.shape == (50, 3, 32, 32)
    assert sorted(set(data.labels.tolist())) == list(range(10))
    assert np.bincount(data.labels).tolist() == [5] * 10
    assert Path(data.paths[0]).parent.name == "airplane"
