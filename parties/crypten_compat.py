"""CrypTen 0.4.1 on torch 2.x: the fixes, applied once before anything imports crypten.

Each fix has a test in tests/test_crypten_compat.py that fails without it.
"""

from __future__ import annotations

import functools
import importlib
import sys
from types import ModuleType

import torch

_applied = False


def _alias_onnx_registration() -> None:
    """torch >= 2.9 moved the ONNX symbolic registry that crypten's converter imports."""
    old = "torch.onnx._internal.registration"
    if old in sys.modules:
        return
    try:
        importlib.import_module(old)
    except ModuleNotFoundError:
        sys.modules[old] = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")


def _torchscript_export(original):
    """crypten's converter needs the TorchScript exporter; torch >= 2.9 defaults to dynamo."""

    @functools.wraps(original)
    def export(*args, **kwargs):
        kwargs.setdefault("dynamo", False)
        return original(*args, **kwargs)

    export.__twinfer_patched__ = True
    return export


def _load_buffers_too(original):
    """crypten.nn.Module.load_state_dict copies parameters but silently skips buffers."""

    @functools.wraps(original)
    def load_from_state_dict(self, state_dict, prefix, strict):
        original(self, state_dict, prefix, strict)
        for name, buffer in list(self._buffers.items()):
            key = prefix + name
            if key not in state_dict:
                if strict and buffer is not None:
                    raise ValueError(f"Key {key} not found in state dict.")
                continue
            value = state_dict[key]
            if buffer is not None and tuple(value.size()) != tuple(buffer.size()):
                raise ValueError(f"Size mismatch for buffer {key}: {tuple(value.size())} vs {tuple(buffer.size())}")
            self._buffers[name] = value.clone() if torch.is_tensor(value) else value

    load_from_state_dict.__twinfer_patched__ = True
    return load_from_state_dict


def import_crypten() -> ModuleType:
    """Import crypten with every fix applied; safe to call many times."""
    global _applied
    _alias_onnx_registration()
    import crypten
    import crypten.nn.module as crypten_module
    import crypten.nn.onnx_converter as converter

    if not _applied:
        if not getattr(converter.torch.onnx.export, "__twinfer_patched__", False):
            # Patch crypten's view of torch.onnx only, not the user's torch.onnx.export.
            converter.torch = _TorchWithScriptExport(torch)
        module_cls = crypten_module.Module
        if not getattr(module_cls._load_from_state_dict_crypten, "__twinfer_patched__", False):
            module_cls._load_from_state_dict_crypten = _load_buffers_too(module_cls._load_from_state_dict_crypten)
        _applied = True
    return crypten


class _TorchWithScriptExport:
    """torch as crypten's converter sees it: torch.onnx.export defaults to dynamo=False."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real
        self.onnx = _OnnxWithScriptExport(real.onnx)

    def __getattr__(self, name):
        return getattr(self._real, name)


class _OnnxWithScriptExport:
    def __init__(self, real: ModuleType) -> None:
        self._real = real
        self.export = _torchscript_export(real.export)

    def __getattr__(self, name):
        return getattr(self._real, name)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int = 17) -> bytes:
    """Export `model` to ONNX bytes with the TorchScript exporter (no onnxscript needed)."""
    import io

    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            export_params=True,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["output"],
            opset_version=opset,
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    finally:
        model.train(was_training)
    return buffer.getvalue()
