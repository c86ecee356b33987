"""Public model inputs (a transformer's attention mask): known to both parties, computed on in the clear.

An attention mask says which tokens are padding; it is public (it tells how many tokens were
sent). What a model computes from its public inputs alone (the mask's additive bias, the
token count of a masked mean) is its *public program*: cut out of the ONNX graph at import,
run by the server with onnxruntime on the client's public inputs, and its results (the
program's outputs) reach both parties, which use them as public operands: added to a secret
value, or multiplying it (a division by one becomes a product with its reciprocal, computed in
the program). A bias of -10000 or finfo.min before a softmax is raised to -MASK_BIAS: the
softmax's exp clips below -EXP_CLIP, so any bias below -(EXP_CLIP + the row's score span) gives
the same probabilities, and a bounded one keeps the fixed point and its comparisons small.

The range check covers the program's outputs over the masks it can take (MaskDomain); a query
whose public inputs give values outside what was covered is refused, not run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ir.graph import GraphError

MASK_BIAS = 1024.0  # masks a row whose scores lie within MASK_BIAS - EXP_CLIP of each other


@dataclass(frozen=True)
class PublicValue:
    """One output of the public program, as the graph declares it: its shape per sample and the
    range its values take over every mask the range check covers."""

    shape: tuple[int, ...]
    lo: float
    hi: float

    def as_json(self) -> dict:
        return {"shape": list(self.shape), "range": [self.lo, self.hi]}


def _dims(value: onnx.ValueInfoProto) -> tuple[int, ...]:
    dims = value.type.tensor_type.shape.dim
    shape = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims)
    if len(shape) < 2 or any(d <= 0 for d in shape[1:]):
        raise GraphError(f"input '{value.name}' needs fixed dimensions after the batch, got {shape}")
    return shape[1:]


class PublicProgram:
    """The part of a model that reads public inputs only: ONNX, run by the server per query."""

    def __init__(self, model: onnx.ModelProto, inputs: dict[str, tuple[int, ...]], outputs: list[str]) -> None:
        self.model = model
        self.inputs = inputs
        self.outputs = outputs
        self.floors: dict[str, float] = {}  # an output whose values below the floor are raised to it
        self._session = None
        self._dtypes: dict[str, type] = {}  # each input's numpy type, as the session declares it

    def _run_one(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(self.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            self._dtypes = {
                i.name: np.int64 if "int64" in i.type else np.bool_ if "bool" in i.type else np.float32 for i in self._session.get_inputs()
            }
        typed = {k: v.astype(self._dtypes[k]) for k, v in feeds.items()}
        values = self._session.run([f"{name}/public" for name in self.outputs], typed)
        out = {}
        for name, value in zip(self.outputs, values):
            value = np.asarray(value, dtype=np.float32)
            if name in self.floors:
                value = np.maximum(value, np.float32(self.floors[name]))
            out[name] = value
        return out

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The program's outputs for a batch of public inputs (N x ... each), N x ... each; sample by
        sample, as its shapes were folded for one."""
        n = len(next(iter(inputs.values())))
        per_sample = [self._run_one({k: np.asarray(inputs[k][i : i + 1]) for k in self.inputs}) for i in range(n)]
        for name in self.outputs:
            if per_sample[0][name].shape[:1] != (1,):
                raise GraphError(f"the public value '{name}' has shape {per_sample[0][name].shape}: it must keep the batch axis")
        return {name: np.concatenate([s[name] for s in per_sample]) for name in self.outputs}

    def masks(self) -> list[dict[str, np.ndarray]]:
        """The public inputs the range check covers: every mask that keeps a prefix or a suffix of
        the last axis (right or left padding), each input varied with the others all ones."""
        ones = {k: np.ones((1, *s), np.float32) for k, s in self.inputs.items()}
        covered = [ones]
        for name, shape in self.inputs.items():
            for kept in range(1, shape[-1]):
                for side in (slice(None, kept), slice(shape[-1] - kept, None)):
                    mask = np.zeros((1, *shape), np.float32)
                    mask[..., side] = 1
                    covered.append(ones | {name: mask})
        return covered

    def bounds(self) -> dict[str, PublicValue]:
        """Each output's shape per sample and its range over `masks()`."""
        runs = [self.run(m) for m in self.masks()]
        found = {}
        for name in self.outputs:
            values = [r[name] for r in runs]
            if not all(np.isfinite(v).all() for v in values):
                raise GraphError(f"the public value '{name}' is not finite for every mask the range check covers")
            found[name] = PublicValue(tuple(values[0].shape[1:]), float(min(v.min() for v in values)), float(max(v.max() for v in values)))
        return found

    def samples(self, n: int, seed: int = 0) -> dict[str, np.ndarray]:
        """`n` masks of random kept lengths (prefixes), for the ranges that samples show."""
        rng = np.random.default_rng(seed)
        drawn = {}
        for name, shape in self.inputs.items():
            kept = rng.integers(1, shape[-1] + 1, n)
            kept[:1] = shape[-1]
            drawn[name] = (np.arange(shape[-1]) < kept.reshape((n,) + (1,) * len(shape))).astype(np.float32) * np.ones(shape, np.float32)
        return drawn


def check_public_inputs(shapes: Mapping[str, tuple[int, ...]], inputs: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """A client's public inputs (`shapes`: the graph's, per sample), checked (names, shapes, 0/1
    masks, one kept token at least), as float32; a ValueError naming what is wrong."""
    missing, extra = sorted(set(shapes) - set(inputs)), sorted(set(inputs) - set(shapes))
    if missing or extra:
        raise ValueError(f"the model's public inputs are {sorted(shapes)}: missing {missing}, unexpected {extra}")
    checked = {}
    for name, shape in shapes.items():
        value = np.asarray(inputs[name])
        if value.shape != (n, *shape):
            raise ValueError(f"public input '{name}' has shape {value.shape}, expected {(n, *shape)} (one row per sample)")
        if not np.isin(value, (0, 1)).all():
            raise ValueError(f"public input '{name}' must be a mask of 0 and 1, got values {np.unique(value)[:8].tolist()}")
        if not value.reshape(n, -1, shape[-1]).any(axis=-1).all():
            raise ValueError(f"public input '{name}' masks every token of a sample; keep at least one")
        checked[name] = value.astype(np.float32)
    return checked


def split_inputs(
    private: str, shapes: Mapping[str, tuple[int, ...]], named: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One array per model input by name -> the secret input (`private`) and the public ones, checked
    (check_public_inputs); a lone array ('' its name) for a model without public inputs."""
    if "" in named:
        if shapes:
            raise ValueError(
                f"the model also takes the public input(s) {sorted(shapes)} (a mask of the tokens sent): "
                f"pass one array per input by name (an .npz with '{private}' and those)"
            )
        return named[""], {}
    if private not in named:
        raise ValueError(f"the model's secret input is '{private}'; the inputs given are {sorted(named)}")
    secret = named[private]
    return secret, check_public_inputs(shapes, {k: v for k, v in named.items() if k != private}, len(secret))


def check_covered(declared: Mapping[str, PublicValue], values: Mapping[str, np.ndarray]) -> None:
    """Public values outside the ranges the range check covered are refused (their answer could be wrong)."""
    for name, spec in declared.items():
        low, high = float(values[name].min()), float(values[name].max())
        slack = 1e-6 * max(1.0, abs(spec.lo), abs(spec.hi))
        if low < spec.lo - slack or high > spec.hi + slack:
            raise ValueError(
                f"the public inputs give '{name}' values in [{low:.6g}, {high:.6g}], outside [{spec.lo:.6g}, {spec.hi:.6g}] "
                "that the server's range check covered (masks that keep a prefix or a suffix of the tokens)"
            )


def _reading(nodes: list[onnx.NodeProto], read: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """Those of `nodes` (in order) whose outputs `read` names, directly or through one another, and
    every name read then."""
    read, chosen = set(read), set()
    for n in reversed(nodes):
        if any(o in read for o in n.output):
            chosen.add(id(n))
            read.update(n.input)
    return [n for n in nodes if id(n) in chosen], read


def split_public(model: onnx.ModelProto, private: str) -> tuple[onnx.ModelProto, PublicProgram | None]:
    """The model without the nodes that read only public inputs (every input but `private`), and
    those nodes as a PublicProgram whose outputs the rest reads; (model, None) with no public input."""
    init = {t.name: t for t in model.graph.initializer}
    public_inputs = {v.name: _dims(v) for v in model.graph.input if v.name not in init and v.name != private}
    if not public_inputs:
        return model, None
    public, constant = set(public_inputs), set(init)
    program_nodes, rest, derived = [], [], []  # derived: computed from constants alone (unfolded)
    for node in model.graph.node:
        reads = [i for i in node.input if i]
        if all(i in constant for i in reads):
            derived.append(node)
            constant.update(node.output)
        elif any(i in public for i in reads) and all(i in public or i in constant for i in reads):
            for i in reads:
                t = init.get(i)
                if t is not None and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
                    value = numpy_helper.to_array(t)
                    if np.unique(value).size > 1:  # a learned tensor, not a scalar such as finfo.min
                        raise GraphError(
                            f"node '{node.name}' ({node.op_type}) combines the public input(s) {sorted(public_inputs)} with the "
                            f"constant '{i}' ({value.size} values): its results would be shown to the client"
                        )
            program_nodes.append(node)
            public.update(node.output)
        else:
            rest.append(node)
    outputs: list[str] = []
    recips: list[onnx.NodeProto] = []
    main_nodes = []
    for node in rest:
        if node.op_type == "Div" and node.input[1] in public and node.input[0] not in public:
            recip = f"{node.input[1]}/reciprocal"
            if recip not in outputs:
                recips.append(helper.make_node("Reciprocal", [node.input[1]], [recip], name=f"{node.name}/reciprocal"))
                outputs.append(recip)
            node = helper.make_node("Mul", [node.input[0], recip], list(node.output), name=node.name)
        for i in node.input:
            if i in public and i not in outputs:
                outputs.append(i)
        main_nodes.append(node)
    if any(o.name in public for o in model.graph.output):
        raise GraphError(f"the model's output depends on its public inputs {sorted(public_inputs)} alone")
    read = {i for n in program_nodes + recips for i in n.input}
    sources, read = _reading(derived, read)  # the constant computations each part still reads
    kept, _ = _reading(derived, {i for n in main_nodes for i in n.input} | {o.name for o in model.graph.output})
    main_nodes = kept + main_nodes
    casts = [helper.make_node("Cast", [name], [f"{name}/public"], to=onnx.TensorProto.FLOAT) for name in outputs]
    graph = helper.make_graph(
        sources + program_nodes + recips + casts, "public_program",
        [v for v in model.graph.input if v.name in public_inputs],
        [helper.make_tensor_value_info(f"{name}/public", onnx.TensorProto.FLOAT, None) for name in outputs],
        [init[i] for i in sorted(read) if i in init],
    )  # fmt: skip
    program = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    main = onnx.ModelProto()
    main.CopyFrom(model)
    del main.graph.node[:]
    main.graph.node.extend(main_nodes)
    kept = [v for v in main.graph.input if v.name not in public_inputs]
    del main.graph.input[:]
    main.graph.input.extend(kept)
    return main, PublicProgram(program, public_inputs, outputs)
