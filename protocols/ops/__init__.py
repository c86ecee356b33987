"""Secure ops, one module per family; importing this package fills the op table."""

from . import activation, attention, embedding, gelu, linear, normalization, pooling, public, shape  # noqa: F401  (each registers its ops)
from .registry import CostInputs, LayerCost, Op, SecureContext, graph_ops, onnx_importer, op_for, supported_onnx_ops

__all__ = ["CostInputs", "LayerCost", "Op", "SecureContext", "graph_ops", "onnx_importer", "op_for", "supported_onnx_ops"]
