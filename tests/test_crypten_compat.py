"""Each CrypTen-on-torch-2.x fix, with a check that fails without it."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from twinfer.protocols.backends.crypten import patches
from twinfer.protocols.backends.crypten.patches import load_crypten
from twinfer.protocols.passes.onnx_import import graph_from_onnx
from twinfer.protocols.passes.plain import run_plain
from twinfer.protocols.passes.onnx_export import export_onnx


def test_registration_moved_and_crypten_imports():
    # Without the alias crypten's converter import fails: the old module path is gone in torch 2.13.
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch.onnx._internal.registration') is not None)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0, "torch still ships the old path"
    fresh = subprocess.run([sys.executable, "-c", "import crypten"], capture_output=True, text=True)
    assert fresh.returncode != 0 and "registration" in fresh.stderr
    crypten = load_crypten()
    assert importlib.import_module("crypten.nn.onnx_converter").from_pytorch is crypten.nn.from_pytorch


def _bn_model(mean: float, var: float) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    # Distinct values everywhere: the exporter would share equal initializers through Identity.
    m[1].weight.data = torch.tensor([1.1, 1.2, 1.3])
    m[1].bias.data = torch.tensor([0.1, 0.2, 0.3])
    m[1].running_mean.copy_(torch.tensor([mean, mean + 0.01, mean + 0.02]))
    m[1].running_var.copy_(torch.tensor([var, var + 0.01, var + 0.02]))
    return m.eval()


@pytest.fixture
def crypten_symbolics_undone():
    """crypten's converter registers its own ONNX symbolics (a Dropout with the `ratio` attribute
    of opsets before 12, among others) for every later TorchScript export at its opset, process
    wide: undone after the test, so that other tests export as torch does."""
    yield
    from crypten.nn.onnx_converter import _OPSET_VERSION

    for op in ("softmax", "log_softmax", "dropout", "feature_dropout"):
        torch.onnx.unregister_custom_op_symbolic(f"aten::{op}", _OPSET_VERSION)


def test_from_pytorch_uses_torchscript_exporter(crypten_symbolics_undone):
    crypten = load_crypten()
    # torch's own default is the dynamo exporter, whose graphs crypten's converter predates (and
    # which fails where onnxscript is not installed): the fix makes the converter's call TorchScript's.
    assert inspect.signature(torch.onnx.export).parameters["dynamo"].default is True
    seen: dict = {}
    patches._torchscript_export(lambda *args, **kwargs: seen.update(kwargs))(None, (), None)
    assert seen == {"dynamo": False}
    assert getattr(importlib.import_module("crypten.nn.onnx_converter").torch.onnx.export, "__twinfer_patched__", False)
    graph = crypten.nn.from_pytorch(_bn_model(0.5, 1.5), torch.zeros(1, 1, 8, 8))
    assert isinstance(graph, crypten.nn.Module)


def test_load_state_dict_copies_buffers():
    crypten = load_crypten()
    source, target = crypten.nn.BatchNorm2d(3), crypten.nn.BatchNorm2d(3)
    source.running_mean = torch.tensor([0.5, 0.6, 0.7])
    source.running_var = torch.tensor([1.5, 1.6, 1.7])
    assert dict(source.named_buffers()), "crypten's BatchNorm keeps its statistics as buffers"
    target.load_state_dict(source.state_dict())
    buffers = dict(target.named_buffers())
    for name, value in source.named_buffers():
        assert torch.equal(buffers[name], value), f"buffer {name} was not copied"


def test_batchnorm_folded_or_turned_into_public_scale_and_shift(tiny_resnet):
    graph, weights = graph_from_onnx(onnx.load_from_string(export_onnx(tiny_resnet, torch.zeros(1, 1, 28, 28))))
    ops = [n.op for n in graph.nodes]
    assert "BatchNormalization" not in ops
    # The BatchNorm after a ReLU cannot be folded: it becomes one elementwise scale-and-shift.
    assert ops.count("Affine") == 1
    x = torch.rand(4, 1, 28, 28)
    got = run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, x)
    np.testing.assert_allclose(got.detach().numpy(), tiny_resnet(x).detach().numpy(), atol=1e-4)
