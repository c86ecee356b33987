"""The one torch -> ONNX exporter every part of twinfer uses."""

from __future__ import annotations

import io
import warnings

import torch


def export_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int = 17) -> bytes:
    """ONNX bytes of `model` in eval mode: the TorchScript exporter (dynamo needs onnxscript),
    no constant folding (weights stay initializers), one input `input`, one output `output`,
    the batch dimension dynamic."""
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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
