"""The model as twinfer runs it: a small public graph of supported ops plus secret weights.

The graph (ops, shapes, attributes) is public model structure and travels to the client as
JSON; the weights stay with the server. `graph_from_onnx` turns a standard ONNX model into
this form, folding BatchNormalization so no party ever divides by a secret variance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

# ONNX ops twinfer accepts; each maps to one secure layer (or none, for shape-only ops).
SUPPORTED_ONNX_OPS = (
    "Conv",
    "Gemm",
    "MatMul",
    "Relu",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "BatchNormalization",
    "Flatten",
    "Reshape",
    "Add",
    "Mul",
    "Identity",
    "Constant",
    "Dropout",
    "Gather",  # a constant table gathered at the model input: a private embedding lookup
)
# Ops of the compiled graph. Affine is a BatchNorm that follows no conv/linear: x * scale + shift.
# MaskedRelu is a Relu that an optimizer replaced by a polynomial outside a public mask.
GRAPH_OPS = (
    "Conv",
    "Gemm",
    "Relu",
    "MaskedRelu",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Affine",
    "Flatten",
    "Reshape",
    "Add",
    "Embedding",  # protocols/embedding.py
)


class GraphError(ValueError):
    """The model cannot be run: malformed, or an attribute twinfer does not support."""


class UnsupportedOpError(GraphError):
    """The model uses ops twinfer has no secure layer for; names every such node."""

    def __init__(self, nodes: list[tuple[str, str]]) -> None:
        self.nodes = nodes
        listed = ", ".join(f"node '{name}' (op {op})" for name, op in nodes)
        super().__init__(
            f"unsupported ONNX op(s): {listed}. Supported ops: {', '.join(SUPPORTED_ONNX_OPS)}"
        )


@dataclass(frozen=True)
class Node:
    """One layer: `inputs` are activations (secret), `weights` name server-owned tensors."""

    name: str
    op: str
    inputs: tuple[str, ...]
    output: str
    weights: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """Public structure of a model: everything but the weight values."""

    input_name: str
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    output_name: str
    nodes: list[Node]
    weight_shapes: dict[str, tuple[int, ...]]

    def to_json(self) -> str:
        return json.dumps(
            {
                "input_name": self.input_name,
                "input_shape": list(self.input_shape),
                "output_name": self.output_name,
                "nodes": [asdict(n) | {"inputs": list(n.inputs), "weights": list(n.weights)} for n in self.nodes],
                "weight_shapes": {k: list(v) for k, v in self.weight_shapes.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "Graph":
        try:
            raw = json.loads(text)
            nodes = [
                Node(
                    name=str(n["name"]),
                    op=str(n["op"]),
                    inputs=tuple(n["inputs"]),
                    output=str(n["output"]),
                    weights=tuple(n["weights"]),
                    attrs=dict(n["attrs"]),
                )
                for n in raw["nodes"]
            ]
            graph = cls(
                input_name=str(raw["input_name"]),
                input_shape=tuple(int(d) for d in raw["input_shape"]),
                output_name=str(raw["output_name"]),
                nodes=nodes,
                weight_shapes={k: tuple(int(d) for d in v) for k, v in raw["weight_shapes"].items()},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise GraphError(f"malformed graph description: {err}") from None
        graph.validate()
        return graph

    def validate(self) -> None:
        """Check ops are known and every value is produced before it is used."""
        known = {self.input_name}
        for node in self.nodes:
            if node.op not in GRAPH_OPS:
                raise UnsupportedOpError([(node.name, node.op)])
            for name in node.inputs:
                if name not in known:
                    raise GraphError(f"node '{node.name}' reads '{name}' before anything produces it")
            for w in node.weights:
                if w not in self.weight_shapes:
                    raise GraphError(f"node '{node.name}' uses weight '{w}' that the graph does not declare")
            if node.op == "MaskedRelu":
                from .masked_activation import check_attrs

                check_attrs(node)
            if node.op == "Embedding":
                from .embedding import check_node

                check_node(self, node)
            known.add(node.output)
        if self.output_name not in known:
            raise GraphError(f"the graph never produces its output '{self.output_name}'")

    def check_weights(self, weights: dict[str, np.ndarray]) -> None:
        """The server's weights must be exactly the declared ones, with the declared shapes."""
        missing = sorted(set(self.weight_shapes) - set(weights))
        extra = sorted(set(weights) - set(self.weight_shapes))
        if missing or extra:
            raise GraphError(f"weights do not match the graph: missing {missing}, unexpected {extra}")
        for name, shape in self.weight_shapes.items():
            if tuple(weights[name].shape) != shape:
                raise GraphError(f"weight '{name}' has shape {tuple(weights[name].shape)}, graph says {shape}")

    def relu_count(self) -> int:
        """ReLU elements per sample: the elements that pay for a secure comparison."""
        return sum(int(n.attrs.get("elements", 0)) for n in self.nodes if n.op in ("Relu", "MaskedRelu"))

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


# -- plaintext evaluation (the reference every private result is compared with) ---------------


def _pool_args(node: Node) -> dict[str, Any]:
    return {"kernel_size": node.attrs["kernel"], "stride": node.attrs["stride"], "padding": node.attrs["padding"]}


def run_plain(graph: Graph, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Evaluate the graph in plaintext with torch.nn.functional."""
    values: dict[str, torch.Tensor] = {graph.input_name: x}
    for node in graph.nodes:
        args = [values[i] for i in node.inputs]
        w = [weights[k] for k in node.weights]
        values[node.output] = _plain_op(node, args, w)
    return values[graph.output_name]


def _plain_op(node: Node, args: list[torch.Tensor], w: list[torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    x = args[0]
    if node.op == "Conv":
        return F.conv2d(x, w[0], w[1] if len(w) > 1 else None, a["stride"], a["padding"], a["dilation"], a["group"])
    if node.op == "Gemm":
        return F.linear(x, w[0], w[1] if len(w) > 1 else None)
    if node.op == "Relu":
        return F.relu(x)
    if node.op == "MaskedRelu":
        from .masked_activation import plain_masked_relu

        return plain_masked_relu(x, node)
    if node.op == "MaxPool":
        return F.max_pool2d(x, **_pool_args(node))
    if node.op == "AveragePool":
        return F.avg_pool2d(x, **_pool_args(node))
    if node.op == "GlobalAveragePool":
        return x.mean(dim=(2, 3), keepdim=True)
    if node.op == "Affine":
        return x * w[0] + w[1]
    if node.op == "Flatten":
        return x.flatten(start_dim=a["axis"])
    if node.op == "Reshape":
        return x.reshape(resolve_reshape(x.shape, a["shape"]))
    if node.op == "Add":
        return x + (args[1] if len(args) > 1 else w[0])
    if node.op == "Embedding":
        from .embedding import plain_embedding

        return plain_embedding(x, w[0])
    raise UnsupportedOpError([(node.name, node.op)])


def resolve_reshape(shape: torch.Size | tuple[int, ...], target: list[int]) -> tuple[int, ...]:
    """ONNX Reshape semantics: 0 copies the input dimension, -1 is inferred."""
    return tuple(shape[i] if d == 0 else d for i, d in enumerate(target))


# -- ONNX import --------------------------------------------------------------------------------


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _symmetric_pads(node: onnx.NodeProto, pads: list[int]) -> list[int]:
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        raise GraphError(f"node '{node.name}' ({node.op_type}) has asymmetric padding {pads}; pad symmetrically")
    return list(pads[:half])


def _pool_attrs(node: onnx.NodeProto, a: dict[str, Any]) -> dict[str, Any]:
    kernel = list(a["kernel_shape"])
    if a.get("ceil_mode", 0):
        raise GraphError(f"node '{node.name}' ({node.op_type}) uses ceil_mode=1, which twinfer does not support")
    if any(d != 1 for d in a.get("dilations", [1] * len(kernel))):
        raise GraphError(f"node '{node.name}' ({node.op_type}) uses dilation, which twinfer does not support")
    pads = _symmetric_pads(node, list(a.get("pads", [0] * 2 * len(kernel))))
    if node.op_type == "AveragePool" and any(pads) and not a.get("count_include_pad", 0):
        raise GraphError(f"node '{node.name}' pads without count_include_pad; export with count_include_pad=True")
    return {"kernel": kernel, "stride": list(a.get("strides", kernel)), "padding": pads}


class _Importer:
    """Walks an ONNX graph once, producing twinfer nodes and the weights they use."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.init = {t.name: numpy_helper.to_array(t).astype(np.float32, copy=True) for t in model.graph.initializer}
        self.ints: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64
        }
        self.weights: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}
        self.consumers: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers[i] = self.consumers.get(i, 0) + 1
        for o in model.graph.output:
            self.consumers[o.name] = self.consumers.get(o.name, 0) + 1

    def name(self, value: str) -> str:
        while value in self.alias:
            value = self.alias[value]
        return value

    def weight(self, node: onnx.NodeProto, value: str, role: str, array: np.ndarray | None = None) -> str:
        if array is None:
            if value not in self.init:
                raise GraphError(f"node '{node.name}' ({node.op_type}): {role} '{value}' must be a constant weight")
            array = self.init[value]
        key = f"{node.name or node.output[0]}.{role}"
        self.weights[key] = np.ascontiguousarray(array, dtype=np.float32)
        return key

    def emit(self, node: onnx.NodeProto, op: str, inputs: list[str], weights: list[str], attrs: dict[str, Any]) -> None:
        self.nodes.append(
            Node(
                name=node.name or node.output[0],
                op=op,
                inputs=tuple(self.name(i) for i in inputs),
                output=node.output[0],
                weights=tuple(weights),
                attrs=attrs,
            )
        )

    def run(self) -> None:
        unsupported = [(n.name or n.output[0], n.op_type) for n in self.model.graph.node if n.op_type not in SUPPORTED_ONNX_OPS]
        if unsupported:
            raise UnsupportedOpError(unsupported)
        for node in self.model.graph.node:
            getattr(self, f"_{node.op_type}")(node, _attrs(node))

    # One method per ONNX op.

    def _Constant(self, node, a):
        value = a.get("value")
        if value is None:
            raise GraphError(f"node '{node.name}' (Constant) has no tensor value")
        array = numpy_helper.to_array(value)
        self.init[node.output[0]] = array.astype(np.float32)
        if value.data_type == onnx.TensorProto.INT64:
            self.ints[node.output[0]] = array

    def _Identity(self, node, a):
        source = node.input[0]
        if source in self.init:  # the exporter shares equal initializers through Identity
            self.init[node.output[0]] = self.init[source]
            if source in self.ints:
                self.ints[node.output[0]] = self.ints[source]
        else:
            self.alias[node.output[0]] = source

    _Dropout = _Identity  # inference mode

    def _Conv(self, node, a):
        w = self.init.get(node.input[1])
        if w is None or w.ndim != 4:
            raise GraphError(f"node '{node.name}' (Conv) needs a constant 4-d kernel; only 2-d convolutions are supported")
        pads = _symmetric_pads(node, list(a.get("pads", [0, 0, 0, 0])))
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise GraphError(f"node '{node.name}' (Conv) uses auto_pad; export with explicit pads")
        weights = [self.weight(node, node.input[1], "weight")]
        if len(node.input) > 2 and node.input[2]:
            weights.append(self.weight(node, node.input[2], "bias"))
        attrs = {
            "stride": list(a.get("strides", [1, 1])),
            "padding": pads,
            "dilation": list(a.get("dilations", [1, 1])),
            "group": int(a.get("group", 1)),
        }
        self.emit(node, "Conv", [node.input[0]], weights, attrs)

    def _Gemm(self, node, a):
        if a.get("transA", 0):
            raise GraphError(f"node '{node.name}' (Gemm) uses transA=1, which twinfer does not support")
        w = self.init.get(node.input[1])
        if w is None:
            raise GraphError(f"node '{node.name}' (Gemm): B must be a constant weight")
        w = w * float(a.get("alpha", 1.0))
        if not a.get("transB", 0):
            w = w.T
        weights = [self.weight(node, node.input[1], "weight", w)]
        if len(node.input) > 2 and node.input[2]:
            weights.append(self.weight(node, node.input[2], "bias", self.init[node.input[2]] * float(a.get("beta", 1.0))))
        self.emit(node, "Gemm", [node.input[0]], weights, {})

    def _MatMul(self, node, a):
        w = self.init.get(node.input[1])
        if w is None or w.ndim != 2:
            raise GraphError(f"node '{node.name}' (MatMul): the right operand must be a constant matrix")
        self.emit(node, "Gemm", [node.input[0]], [self.weight(node, node.input[1], "weight", w.T)], {})

    def _Gather(self, node, a):
        table, ids = node.input
        inputs = {i.name for i in self.model.graph.input}
        if table not in self.init or self.init[table].ndim != 2 or int(a.get("axis", 0)) != 0 or ids not in inputs:
            raise GraphError(
                f"node '{node.name}' (Gather) is supported only as an embedding lookup: a constant 2-d table, "
                "axis 0, indices taken straight from the model input"
            )
        rows, dim = self.init[table].shape
        self.emit(node, "Embedding", [ids], [self.weight(node, table, "table")], {"rows": int(rows), "dim": int(dim)})

    def _Relu(self, node, a):
        self.emit(node, "Relu", [node.input[0]], [], {})

    def _MaxPool(self, node, a):
        if len(node.output) > 1 and node.output[1]:
            raise GraphError(f"node '{node.name}' (MaxPool) returns indices, which twinfer does not support")
        self.emit(node, "MaxPool", [node.input[0]], [], _pool_attrs(node, a))

    def _AveragePool(self, node, a):
        self.emit(node, "AveragePool", [node.input[0]], [], _pool_attrs(node, a))

    def _GlobalAveragePool(self, node, a):
        self.emit(node, "GlobalAveragePool", [node.input[0]], [], {})

    def _Flatten(self, node, a):
        self.emit(node, "Flatten", [node.input[0]], [], {"axis": int(a.get("axis", 1))})

    def _Reshape(self, node, a):
        shape = self.ints.get(node.input[1])
        if shape is None:
            raise GraphError(
                f"node '{node.name}' (Reshape) takes its shape from a computed value; export with "
                "torch.flatten / nn.Flatten, or a constant shape"
            )
        self.emit(node, "Reshape", [node.input[0]], [], {"shape": [int(d) for d in shape]})

    def _Add(self, node, a):
        left, right = node.input
        if left in self.init and right in self.init:
            raise GraphError(f"node '{node.name}' (Add) adds two constants; fold it before export")
        if right in self.init or left in self.init:
            value, other = (right, left) if right in self.init else (left, right)
            self.emit(node, "Add", [other], [self.weight(node, value, "addend")], {})
        else:
            self.emit(node, "Add", [left, right], [], {})

    def _Mul(self, node, a):
        left, right = node.input
        if (left in self.init) == (right in self.init):
            raise GraphError(f"node '{node.name}' (Mul) must multiply an activation by a constant")
        value, other = (right, left) if right in self.init else (left, right)
        scale = self.init[value]
        shift = np.zeros_like(scale)
        self.emit(node, "Affine", [other], [self.weight(node, value, "scale"), self.weight(node, "", "shift", shift)], {})

    def _BatchNormalization(self, node, a):
        if len(node.output) > 1 and any(node.output[1:]):
            raise GraphError(f"node '{node.name}' (BatchNormalization) is in training mode; export the model in eval()")
        gamma, beta, mean, var = (self.init.get(i) for i in node.input[1:5])
        if any(v is None for v in (gamma, beta, mean, var)):
            raise GraphError(f"node '{node.name}' (BatchNormalization) needs constant statistics")
        scale = gamma / np.sqrt(var + float(a.get("epsilon", 1e-5)))
        shift = beta - mean * scale
        source = self.name(node.input[0])
        producer = self.nodes[-1] if self.nodes and self.nodes[-1].output == source else None
        if producer is not None and producer.op in ("Conv", "Gemm") and self.consumers.get(source, 0) == 1:
            self._fold_into(producer, scale, shift)
            self.alias[node.output[0]] = source
            return
        # Not after a conv/linear (e.g. after a ReLU): the server turns it into scale and shift.
        bshape = (-1,) + (1,) * 2  # per channel of an N x C x H x W activation
        self.emit(
            node,
            "Affine",
            [node.input[0]],
            [self.weight(node, "", "scale", scale.reshape(bshape)), self.weight(node, "", "shift", shift.reshape(bshape))],
            {},
        )

    def _fold_into(self, producer: Node, scale: np.ndarray, shift: np.ndarray) -> None:
        """y = scale * (W x + b) + shift  ==  (scale W) x + (scale b + shift)."""
        w_key = producer.weights[0]
        w = self.weights[w_key]
        self.weights[w_key] = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        if len(producer.weights) > 1:
            b_key = producer.weights[1]
            self.weights[b_key] = self.weights[b_key] * scale + shift
        else:
            b_key = f"{producer.name}.bias"
            self.weights[b_key] = shift.astype(np.float32)
            index = self.nodes.index(producer)
            self.nodes[index] = Node(
                name=producer.name,
                op=producer.op,
                inputs=producer.inputs,
                output=producer.output,
                weights=producer.weights + (b_key,),
                attrs=producer.attrs,
            )


def _input_shape(model: onnx.ModelProto, initializers: set[str]) -> tuple[str, tuple[int, ...]]:
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise GraphError(f"the model must have exactly one input, it has {len(inputs)}: {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims)
    if len(shape) < 2 or any(d <= 0 for d in shape[1:]):
        raise GraphError(f"input '{inputs[0].name}' needs fixed dimensions after the batch, got {shape}")
    return inputs[0].name, shape[1:]


def graph_from_onnx(model: onnx.ModelProto) -> tuple[Graph, dict[str, np.ndarray]]:
    """Compile an ONNX model into a public graph and the server's weights."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise GraphError(f"invalid ONNX model: {str(err).splitlines()[0]}") from None
    if len(model.graph.output) != 1:
        raise GraphError(f"the model must have exactly one output, it has {len(model.graph.output)}")
    importer = _Importer(model)
    importer.run()
    input_name, input_shape = _input_shape(model, set(importer.init))
    graph = Graph(
        input_name=input_name,
        input_shape=input_shape,
        output_name=importer.name(model.graph.output[0].name),
        nodes=importer.nodes,
        weight_shapes={k: tuple(v.shape) for k, v in importer.weights.items()},
    )
    graph.validate()
    _annotate_shapes(graph, importer.weights)
    return graph, importer.weights


def _annotate_shapes(graph: Graph, weights: dict[str, np.ndarray]) -> None:
    """Run one zero sample through the graph: checks it executes and records ReLU sizes."""
    values: dict[str, torch.Tensor] = {graph.input_name: torch.zeros((1, *graph.input_shape))}
    tw = {k: torch.from_numpy(v) for k, v in weights.items()}
    for i, node in enumerate(graph.nodes):
        try:
            out = _plain_op(node, [values[n] for n in node.inputs], [tw[k] for k in node.weights])
        except RuntimeError as err:
            raise GraphError(f"node '{node.name}' ({node.op}) cannot run on input {tuple(values[node.inputs[0]].shape)}: {err}") from None
        values[node.output] = out
        node.attrs["out_shape"] = list(out.shape[1:])
        if node.op == "Relu":
            node.attrs["elements"] = int(out[0].numel())
