"""load_model on real files: the shared CIFAR ResNet-20 checkpoint, EfficientNet-Lite0's packaged weights, export
archives, and the broken or unsupported files users actually hand over."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from zeroquant.errors import ModelLoadError, UnsupportedModelError, UsageError
from zeroquant.zoo.architectures import ARCHITECTURES
from zeroquant.zoo.loading import load_model
from zeroquant.zoo.registry import zoo_entry

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RESNET20 = SHARED / "models" / "cifar10" / "resnet20.th"


@pytest.fixture(scope="module")
def resnet20_state() -> dict[str, torch.Tensor]:
    """The shared checkpoint's weights without DataParallel's `module.` prefix."""
    checkpoint = torch.load(RESNET20, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}


@pytest.fixture(scope="module")
def reference_resnet20(resnet20_state) -> nn.Module:
    model = ARCHITECTURES["cifar_resnet"](depth=20, num_classes=10)
    model.load_state_dict(resnet20_state, strict=True)
    return model.eval()


def tiny_bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()


def assert_same_logits(loaded, reference, shape=(2, 3, 32, 32)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = loaded(x)
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    return out


def test_resnet20_checkpoint_with_arch(tmp_path, reference_resnet20):
    # The shared file is a legacy-format checkpoint dict; re-save it (zip format, odd extension) nested the same way.
    path = tmp_path / "my_weights.ckpt"
    torch.save(torch.load(RESNET20, map_location="cpu", weights_only=True), path)
    loaded = load_model(str(path), arch="resnet20_cifar10")
    assert (loaded.name, loaded.input_shape, loaded.exported) == ("my_weights", (3, 32, 32), None)
    assert loaded.preprocessing == zoo_entry("resnet20_cifar10").preprocessing
    assert not loaded.module.training
    assert assert_same_logits(loaded.module, reference_resnet20).shape == (2, 10)


def test_resnet20_from_zoo(reference_resnet20):
    loaded = load_model("zoo:resnet20_cifar10")
    assert loaded.name == "resnet20_cifar10" and loaded.input_shape == (3, 32, 32)
    assert assert_same_logits(loaded.module, reference_resnet20).shape == (2, 10)


def test_resnet20_architecture_classifies_real_images(reference_resnet20):
    """Strict key matching cannot catch a wrong shortcut or pooling: real CIFAR-10 test images can."""
    classes = sorted(p.name for p in (SHARED / "data" / "cifar10" / "test").iterdir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((SHARED / "data" / "cifar10" / "test" / name).iterdir())[:3]:
            images.append(np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255)
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        predicted = reference_resnet20(x).argmax(1)
    assert (predicted == torch.tensor(labels)).float().mean() >= 0.7


def test_zoo_weights_override_and_missing_weights(tmp_path, resnet20_state):
    path = tmp_path / "w.pt"
    torch.save(resnet20_state, path)
    assert load_model("zoo:resnet20_cifar10", weights=str(path)).name == "resnet20_cifar10"
    with pytest.raises(UsageError, match="--weights FILE"):
        load_model("zoo:resnet44_cifar10")
    with pytest.raises(ModelLoadError, match="nowhere.pt"):
        load_model("zoo:resnet44_cifar10", weights=str(tmp_path / "nowhere.pt"))
    with pytest.raises(UsageError, match="unknown zoo model"):
        load_model("zoo:nope")


def test_efficientnet_lite0_from_package():
    loaded = load_model("zoo:efficientnet_lite0")
    assert loaded.input_shape == (3, 224, 224) and loaded.preprocessing.name == "efficientnet"
    with torch.no_grad():
        assert loaded.module(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_export_archive_detected_by_content(tmp_path):
    model = tiny_bn_cnn()
    path = tmp_path / "exported.bin"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), path)
    loaded = load_model(str(path))
    assert loaded.exported is not None and loaded.name == "exported" and loaded.input_shape == (3, 8, 8)
    assert loaded.preprocessing is None
    assert_same_logits(loaded.module, model, shape=(1, 3, 8, 8))
    with pytest.raises(UsageError, match="state_dict files only"):
        load_model(str(path), arch="resnet20_cifar10")


def test_export_archive_in_training_mode_is_rejected(tmp_path):
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(tiny_bn_cnn().train(), (torch.randn(2, 3, 8, 8),)), path)
    with pytest.raises(UnsupportedModelError, match="training mode"):
        load_model(str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_is_refused_with_export_recipe(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(tiny_bn_cnn(), torch.randn(1, 3, 8, 8)), path)
    with pytest.raises(ModelLoadError, match=r"TorchScript.*torch\.export\.export"):
        load_model(str(path))


def test_pickled_module_needs_trust(tmp_path):
    model = tiny_bn_cnn()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(ModelLoadError, match="pickled.*--trust-pickle"):
        load_model(str(path))
    loaded = load_model(str(path), trust_pickle=True)
    assert loaded.input_shape is None and not loaded.module.training
    assert_same_logits(loaded.module, model, shape=(1, 3, 8, 8))
    with pytest.raises(UsageError, match="state_dict files only"):
        load_model(str(path), arch="resnet20_cifar10", trust_pickle=True)


def test_state_dict_without_arch_lists_zoo(tmp_path, resnet20_state):
    path = tmp_path / "sd.pt"
    torch.save(resnet20_state, path)
    with pytest.raises(UsageError, match="--arch.*resnet20_cifar10.*resnet32_cifar10") as error:
        load_model(str(path))
    assert "efficientnet_lite0" in str(error.value)


def test_mismatched_weights_name_the_keys(tmp_path, resnet20_state):
    path = tmp_path / "sd.pt"
    torch.save({**resnet20_state, "linear.weight": torch.zeros(5, 64)}, path)
    with pytest.raises(ModelLoadError, match=r"shape mismatch: linear\.weight \(5, 64\).*\(10, 64\)"):
        load_model(str(path), arch="resnet20_cifar10")
    torch.save({k.replace("layer1.2.", "layer1.3."): v for k, v in resnet20_state.items()}, path)
    with pytest.raises(ModelLoadError, match=r"missing keys: layer1\.2\.conv1\.weight.*unexpected keys: layer1\.3"):
        load_model(str(path), arch="resnet20_cifar10")


@pytest.mark.parametrize("content", ["random", "truncated"])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "broken.pt"
    if content == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    else:
        torch.save(tiny_bn_cnn().state_dict(), path)
        path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ModelLoadError, match="cannot read model file .*broken.pt: not a torch.export archive"):
        load_model(str(path), arch="resnet20_cifar10")


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found: .*absent.pt"):
        load_model(str(tmp_path / "absent.pt"))
    with pytest.raises(UsageError, match="--weights"):
        load_model(str(RESNET20), arch="resnet20_cifar10", weights=str(RESNET20))
    with pytest.raises(UsageError, match="contradicts"):
        load_model("zoo:resnet20_cifar10", arch="resnet32_cifar10")


def test_non_finite_weight_is_named(tmp_path, resnet20_state):
    bad = dict(resnet20_state)
    bad["layer2.0.bn1.running_var"] = bad["layer2.0.bn1.running_var"].clone()
    bad["layer2.0.bn1.running_var"][3] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(bad, path)
    with pytest.raises(UnsupportedModelError, match=r"layer2\.0\.bn1\.running_var"):
        load_model(str(path), arch="resnet20_cifar10")
