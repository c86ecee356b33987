"""Tests for the Fashion-MNIST loader and the demo models."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from twinfer.optimizer.common.training import evaluate_accuracy
from twinfer.optimizer.data.datasets import FASHION_MNIST_DIR, DatasetError, load_fashion_mnist
from twinfer.optimizer.zoo.demo_models import (
    FashionCNN,
    TinyResNet,
    build_demo_model,
    load_or_train_demo_model,
    save_state_dict,
    train_classifier,
)

needs_data = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="apt-get install -y dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    """The 10k-image test split, loaded once for the module."""
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("apt-get install -y dataset-fashion-mnist")
    return load_fashion_mnist("test")


@needs_data
def test_test_split_shapes_dtypes_and_ranges(test_split: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = test_split
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (10_000,) and labels.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.5
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_unknown_split_names_allowed_values() -> None:
    with pytest.raises(ValueError, match="test.*train"):
        load_fashion_mnist("validation")


def test_missing_root_mentions_apt_get(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist") as info:
        load_fashion_mnist("test", root=tmp_path / "nowhere")
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)


def test_bad_magic_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    header = (1234).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (1, 28, 28))
    with gzip.open(bad, "wb") as f:
        f.write(header + bytes(28 * 28))
    with pytest.raises(DatasetError, match="magic number 1234") as info:
        load_fashion_mnist("test", root=tmp_path)
    assert str(bad) in str(info.value)


@needs_data
def test_truncated_payload_is_malformed(tmp_path: Path) -> None:
    # Good labels file, images file whose header promises more bytes than it holds.
    shutil.copy(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz", tmp_path)
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10_000, 28, 28))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + bytes(100))
    with pytest.raises(DatasetError, match="malformed.*t10k-images"):
        load_fashion_mnist("test", root=tmp_path)


@pytest.mark.parametrize("model_cls", [FashionCNN, TinyResNet])
def test_models_output_ten_logits(model_cls: type[torch.nn.Module]) -> None:
    model = model_cls().eval()
    with torch.no_grad():
        assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", ["fashion_cnn", "tiny_resnet"])
def test_safetensors_round_trip_keeps_bn_stats(name: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((64, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, 64)
    model = build_demo_model(name)
    initial_stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    train_classifier(model, images, labels, epochs=1, batch_size=16, progress=False)
    # Training must have moved every BN running statistic, or the comparison proves nothing.
    assert all(not torch.equal(model.state_dict()[k], v) for k, v in initial_stats.items())

    save_state_dict(model, tmp_path / f"{name}.safetensors")
    loaded = load_or_train_demo_model(name, tmp_path, progress=False)
    assert not loaded.training
    x = torch.as_tensor(images[:8])
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_a_cached_model_from_another_recipe_is_trained_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twinfer.optimizer.zoo import demo_models

    trained = []
    monkeypatch.setattr(demo_models, "load_fashion_mnist", lambda split: (np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64)))
    monkeypatch.setattr(demo_models, "train_classifier", lambda model, *a, **kw: trained.append(kw) or model)
    path = tmp_path / "resnet_fmnist.safetensors"
    save_state_dict(build_demo_model("resnet_fmnist"), path, metadata={"recipe": "epochs=2,cosine=False"})
    load_or_train_demo_model("resnet_fmnist", tmp_path, progress=False)
    assert len(trained) == 1 and trained[0]["cosine"] is True
    load_or_train_demo_model("resnet_fmnist", tmp_path, progress=False)  # now cached with its own recipe
    assert len(trained) == 1


def test_cosine_schedule_ends_at_a_zero_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    rates = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **kw: (rates.append(self.param_groups[0]["lr"]), step(self, *a, **kw))[1])
    images, labels = np.zeros((40, 1, 28, 28), np.float32), np.zeros(40, np.int64)
    train_classifier(build_demo_model("fashion_cnn"), images, labels, epochs=2, batch_size=8, cosine=True, progress=False)
    assert len(rates) == 10 and rates[0] == pytest.approx(2e-3) and rates[-1] < 1e-4
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_training_is_deterministic_given_seed() -> None:
    rng = np.random.default_rng(1)
    images = rng.random((32, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, 32)
    first, second = (
        train_classifier(
            build_demo_model("fashion_cnn"), images, labels, epochs=1, batch_size=8, progress=False
        )
        for _ in range(2)
    )
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_evaluate_accuracy_restores_mode() -> None:
    model = build_demo_model("tiny_resnet").train()
    accuracy = evaluate_accuracy(model, np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64))
    assert 0.0 <= accuracy <= 1.0 and model.training


def test_unknown_model_name_lists_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fashion_cnn.*tiny_resnet"):
        load_or_train_demo_model("resnet50", tmp_path)
