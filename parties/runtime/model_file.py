"""Reading what a party is given: a model (server) or an input array (client).

A model is an ONNX file or an optimizer artifact directory (protocols/artifact_format.py).
Nothing here unpickles: ONNX is protobuf, artifacts are JSON and safetensors, inputs are .npy
files read with allow_pickle=False.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from twinfer.protocols import artifact_format as af
from twinfer.protocols.ops.embedding import check_ids
from twinfer.protocols.ir.graph import Graph, GraphError
from twinfer.protocols.ir.onnx_import import graph_from_onnx

from twinfer.parties.errors import InputError, ModelError


def parse_model(data: bytes, source: str = "model") -> tuple[Graph, dict[str, np.ndarray]]:
    """Compile serialized ONNX, or an artifact bundle, into the public graph and the server's weights."""
    if af.is_bundle(data):
        try:
            onnx_bytes, manifest, tensors = af.unpack_bundle(data)
            graph, weights = parse_model(onnx_bytes, source=f"{source}/{af.MODEL_FILE}")
            return af.apply_manifest(graph, manifest, tensors), weights
        except GraphError as err:
            raise ModelError(f"{source}: {err}") from None
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ModelError(f"{source} is not a valid ONNX file: {err}") from None
    if not model.graph.node:
        raise ModelError(f"{source} is not a valid ONNX model: it has no nodes")
    try:
        return graph_from_onnx(model)
    except GraphError as err:
        raise ModelError(f"{source}: {err}") from None


def read_model_bytes(path: str | Path) -> bytes:
    """The bytes of an ONNX model file or of an artifact directory, with a clear error when it is missing."""
    path = Path(path)
    if path.is_dir() and (path / af.MANIFEST_FILE).exists():
        return read_artifact(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.onnx"))
        if len(candidates) != 1:
            raise ModelError(f"model directory {path} must hold exactly one .onnx file, found {len(candidates)}")
        path = candidates[0]
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if path.suffix != ".onnx":
        raise ModelError(f"model file {path} must be an ONNX file (.onnx); export torch models with torch.onnx.export")
    return path.read_bytes()


def read_artifact(path: Path) -> bytes:
    """Check an artifact directory's manifest and digests; return it as one bundle."""
    try:
        manifest = json.loads((path / af.MANIFEST_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path / af.MANIFEST_FILE} cannot be read as JSON: {err}") from None
    files = {}
    for name in (af.MODEL_FILE, af.TENSORS_FILE):
        if not (path / name).exists():
            raise ModelError(f"artifact {path} lacks {name}")
        files[name] = (path / name).read_bytes()
    try:
        af.check_manifest(manifest, files)
        from safetensors.numpy import load

        tensors = load(files[af.TENSORS_FILE])
    except GraphError as err:
        raise ModelError(f"artifact {path}: {err}") from None
    except Exception as err:  # safetensors raises its own error type for a corrupt file
        raise ModelError(f"artifact {path}: {af.TENSORS_FILE} is not a valid safetensors file: {err}") from None
    return af.pack_bundle(files[af.MODEL_FILE], manifest, tensors)


def load_model(path: str | Path) -> tuple[Graph, dict[str, np.ndarray]]:
    return parse_model(read_model_bytes(path), source=str(path))


def load_input(path: str | Path) -> np.ndarray:
    """A client's input: a float array saved with numpy.save, one sample per row."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise InputError(f"input file {path} is not a plain .npy array (pickled objects are refused): {err}") from None
    except OSError as err:
        raise InputError(f"input file {path} cannot be read as .npy: {err}") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"input file {path} must hold a numeric array, got {getattr(array, 'dtype', type(array))}")
    return array.astype(np.float32, copy=False)


def check_input_fits(graph: Graph, inputs: np.ndarray) -> None:
    """Fail before any party starts when the input cannot go through the model."""
    if inputs.ndim == len(graph.input_shape):  # a single sample: add the batch dimension
        raise InputError(
            f"input has shape {inputs.shape}; add the batch dimension: expected (N, {', '.join(map(str, graph.input_shape))})"
        )
    if tuple(inputs.shape[1:]) != graph.input_shape or inputs.shape[0] < 1:
        raise InputError(f"input has shape {inputs.shape}, but the model expects (N, {', '.join(map(str, graph.input_shape))})")
    if not np.isfinite(inputs).all():
        raise InputError("input contains NaN or infinite values")
    try:
        check_ids(graph, inputs)  # an embedding model's input: integer ids in range
    except ValueError as err:
        raise InputError(str(err)) from None
