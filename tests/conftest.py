"""Shared fixtures: small real models and Fashion-MNIST test images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from twinfer.optimizer.data.datasets import load_fashion_mnist
from twinfer.optimizer.zoo.demo_models import load_or_train_demo_model

os.environ.setdefault("TWINFER_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))


@pytest.fixture(scope="session")
def cache() -> Path:
    from twinfer.deploy.config.paths import cache_dir

    return cache_dir()


@pytest.fixture(scope="session")
def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def fashion_cnn(cache: Path) -> torch.nn.Module:
    return load_or_train_demo_model("fashion_cnn", cache / "models", progress=False)


@pytest.fixture(scope="session")
def tiny_resnet(cache: Path) -> torch.nn.Module:
    return load_or_train_demo_model("tiny_resnet", cache / "models", progress=False)


@pytest.fixture(scope="session")
def pixel_cnn(cache: Path) -> torch.nn.Module:
    """A CNN on raw 0-255 pixels, BatchNorm after each ReLU (Fashion-MNIST x 255)."""
    return load_or_train_demo_model("pixel_cnn", cache / "models", progress=False)


@pytest.fixture(scope="session")
def onnx_files(tmp_path_factory, fashion_cnn, tiny_resnet) -> dict[str, Path]:
    """Both demo models as standard ONNX files (TorchScript exporter, BatchNorm kept as nodes)."""
    from twinfer.protocols.passes.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, model in (("fashion_cnn", fashion_cnn), ("tiny_resnet", tiny_resnet)):
        paths[name] = out / f"{name}.onnx"
        paths[name].write_bytes(export_onnx(model, torch.zeros(1, 1, 28, 28)))
    return paths
