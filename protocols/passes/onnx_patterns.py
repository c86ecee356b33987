"""What exporters write around the math, made plain before import.

1. **Public shape computations** (Shape, Gather and Unsqueeze on shapes, ConstantOfShape,
   Expand, Equal and Where on shapes, Range): `torch.onnx.export` of a Hugging Face encoder
   writes them; they depend on no secret, only on the input's shape. onnxruntime's basic graph
   optimisation folds them into constants once, at import, for one sample (batch 1); the
   importer then reads a reshape's leading 1 as the batch (`Importer.fixed_batch`).
2. **Spelled-out functions**: GeLU as x * 0.5 * (1 + erf(x / sqrt 2)) (opsets before 20) and
   LayerNorm as ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add (opsets before
   17) become the one node each that twinfer runs (Gelu, LayerNormalization).
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ir.graph import GraphError

SHAPE_OPS = frozenset({"Shape", "ConstantOfShape", "Expand", "Equal", "Where", "Range", "GatherElements", "Size", "NonZero"})
# onnxruntime's basic level would also fuse a MatMul and its Add into a Gemm between two
# reshapes that merge the batch with the tokens: twinfer keeps the batch axis apart.
_KEEP_UNFUSED = ["MatMulAddFusion"]


def fold_public_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """The model with its shape computations folded into constants (for a batch of 1), and whether
    there were any; a model without them is returned as it is."""
    if not any(n.op_type in SHAPE_OPS for n in model.graph.node):
        return model, False
    try:
        import onnxruntime as ort
    except ImportError:  # a declared dependency: only a broken install lacks it
        raise GraphError("the model computes shapes at run time, which needs onnxruntime to fold: pip install onnxruntime") from None
    batch_one = copy.deepcopy(model)
    initializers = {t.name for t in batch_one.graph.initializer}
    for value in batch_one.graph.input:
        if value.name not in initializers and value.type.tensor_type.shape.dim:
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_value = 1
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = os.path.join(folder, "folded.onnx")
        try:
            ort.InferenceSession(batch_one.SerializeToString(), options, providers=["CPUExecutionProvider"], disabled_optimizers=_KEEP_UNFUSED)
        except Exception as err:  # onnxruntime raises its own exception types
            raise GraphError(f"cannot fold the model's shape computations: {str(err).splitlines()[0]}") from None
        folded = onnx.load(options.optimized_model_filepath)
    return folded, True


def refuse_unfolded(model: onnx.ModelProto) -> None:
    """Shape computations left after folding (and after the public inputs' own are cut out:
    public_inputs.py) depend on a secret value: refused, naming each."""
    left = [(n.name or n.output[0], n.op_type) for n in model.graph.node if n.op_type in SHAPE_OPS]
    if left:
        listed = ", ".join(f"node '{name}' (op {op})" for name, op in left)
        raise GraphError(f"shape computations that depend on a secret value cannot be folded: {listed}")


class _Graph:
    """Producers, consumers and constants of an ONNX graph, for matching patterns."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant":
                value = next((a.t for a in n.attribute if a.name == "value"), None)
                if value is not None:
                    self.init[n.output[0]] = numpy_helper.to_array(value)
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in model.graph.output}

    def only_consumer(self, value: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(value, [])
        if len(users) == 1 and users[0].op_type == op_type and value not in self.outputs:
            return users[0]
        return None

    def scalar(self, value: str) -> float | None:
        array = self.init.get(value)
        return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None

    def other(self, node: onnx.NodeProto, value: str) -> str:
        """The input of a binary node that is not `value`."""
        a, b = node.input
        return b if a == value else a


def _close(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= 1e-4 * abs(target)


def _match_gelu(g: _Graph, erf: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str, str] | None:
    """x * 0.5 * (1 + erf(x / sqrt 2)) in either order of its products: (nodes, x, output)."""
    scaled = g.producer.get(erf.input[0])
    if scaled is None or scaled.op_type not in ("Div", "Mul"):
        return None
    x = scaled.input[0]
    factor = g.scalar(scaled.input[1])
    if not (_close(factor, np.sqrt(2.0)) if scaled.op_type == "Div" else _close(factor, 1 / np.sqrt(2.0))):
        return None
    plus = g.only_consumer(erf.output[0], "Add")
    if plus is None or not _close(g.scalar(g.other(plus, erf.output[0])), 1.0):
        return None
    product = g.only_consumer(plus.output[0], "Mul")
    if product is None:
        return None
    partner = g.other(product, plus.output[0])
    if partner == x:  # (x * (1 + erf)) * 0.5
        half = g.only_consumer(product.output[0], "Mul")
        if half is None or not _close(g.scalar(g.other(half, product.output[0])), 0.5):
            return None
        return [scaled, erf, plus, product, half], x, half.output[0]
    halving = g.producer.get(partner)  # (x * 0.5) * (1 + erf)
    if halving is not None and halving.op_type == "Mul" and x in halving.input and _close(g.scalar(g.other(halving, x)), 0.5):
        if len(g.consumers[halving.output[0]]) == 1:
            return [scaled, erf, plus, halving, product], x, product.output[0]
    return None


def _reduces_last(g: _Graph, node: onnx.NodeProto) -> bool:
    axes = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1:
        axes = list(g.init.get(node.input[1], np.array([])).reshape(-1))
    return axes == [-1]


def _match_layer_norm(g: _Graph, mean: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[str], str, float] | None:
    """ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul gamma, Add beta:
    (nodes, [x, gamma, beta], output, eps)."""
    if not _reduces_last(g, mean):
        return None
    x = mean.input[0]
    sub = next((n for n in g.consumers.get(mean.output[0], []) if n.op_type == "Sub" and list(n.input) == [x, mean.output[0]]), None)
    if sub is None or len(g.consumers[mean.output[0]]) != 1:
        return None
    d = sub.output[0]
    users = g.consumers.get(d, [])
    power = next((n for n in users if n.op_type == "Pow" and n.input[0] == d and _close(g.scalar(n.input[1]), 2.0)), None)
    divide = next((n for n in users if n.op_type == "Div" and n.input[0] == d), None)
    if power is None or divide is None or len(users) != 2:
        return None
    variance = g.only_consumer(power.output[0], "ReduceMean")
    if variance is None or not _reduces_last(g, variance):
        return None
    plus = g.only_consumer(variance.output[0], "Add")
    eps = g.scalar(g.other(plus, variance.output[0])) if plus is not None else None
    root = g.only_consumer(plus.output[0], "Sqrt") if plus is not None else None
    if eps is None or root is None or divide.input[1] != root.output[0]:
        return None
    scale = g.only_consumer(divide.output[0], "Mul")
    gamma = g.other(scale, divide.output[0]) if scale is not None else None
    shift = g.only_consumer(scale.output[0], "Add") if scale is not None else None
    beta = g.other(shift, scale.output[0]) if shift is not None else None
    if gamma not in g.init or beta not in g.init:
        return None
    return [mean, sub, power, variance, plus, root, divide, scale, shift], [x, gamma, beta], shift.output[0], eps


def fuse_spelled_out(model: onnx.ModelProto) -> onnx.ModelProto:
    """GeLU and LayerNorm spelled out in elementary ops become one Gelu / LayerNormalization node
    each (placed where the last of their nodes was); everything else stays as it is."""
    g = _Graph(model)
    replaced: dict[str, onnx.NodeProto] = {}  # the last node of a match -> its fused node
    dropped: set[int] = set()
    for node in model.graph.node:
        if id(node) in dropped:
            continue
        if node.op_type == "Erf":
            match = _match_gelu(g, node)
            if match is not None:
                nodes, x, out = match
                fused = helper.make_node("Gelu", [x], [out], name=f"{node.name or out}/Gelu")
        elif node.op_type == "ReduceMean":
            match = _match_layer_norm(g, node)
            if match is not None:
                nodes, inputs, out, eps = match
                fused = helper.make_node("LayerNormalization", inputs, [out], name=f"{node.name or out}/LayerNorm", axis=-1, epsilon=eps)
        else:
            match = None
        if match is None or any(id(n) in dropped for n in nodes):
            continue
        dropped.update(id(n) for n in nodes)
        replaced[nodes[-1].output[0]] = fused
    if not replaced:
        return model
    out = copy.deepcopy(model)
    kept = []
    for node in model.graph.node:
        if id(node) not in dropped:
            kept.append(node)
        elif node.output[0] in replaced:
            kept.append(replaced[node.output[0]])
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out
