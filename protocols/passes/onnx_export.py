"""The one torch -> ONNX exporter every part of twinfer uses."""

from __future__ import annotations

import io
import warnings

import torch


def export_onnx(
    model: torch.nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], opset: int = 17, input_names: tuple[str, ...] = ("input",)
) -> bytes:
    """ONNX bytes of `model` in eval mode: the TorchScript exporter (dynamo needs onnxscript),
    no constant folding (weights stay initializers), its inputs named `input_names` (one `input`
    by default: a tuple `example` takes one name each), one output `output`, the batch dynamic."""
    examples = example if isinstance(example, tuple) else (example,)
    if len(examples) != len(input_names):
        raise ValueError(f"{len(examples)} example inputs but {len(input_names)} input names")
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                examples,
                buffer,
                dynamo=False,
                export_params=True,
                do_constant_folding=False,
                input_names=list(input_names),
                output_names=["output"],
                opset_version=opset,
                dynamic_axes={name: {0: "batch"} for name in (*input_names, "output")},
            )
    finally:
        model.train(was_training)
    return buffer.getvalue()
