"""Reading what a party is given: a model (server) or an input array (client).

A model is an ONNX file or an optimizer artifact directory (protocols/artifact.py).
Nothing here unpickles: ONNX is protobuf, artifacts are JSON and safetensors, inputs are .npy
files read with allow_pickle=False.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from twinfer.protocols import artifact as af
from twinfer.protocols.ops.embedding import check_ids, embedding_node
from twinfer.protocols.ir.graph import Graph, GraphError, check_input_range
from twinfer.protocols.passes.onnx_import import graph_from_onnx
from twinfer.protocols.passes.encoding import (
    SIMULATED_SAMPLES,
    SYNTHETIC_SAMPLES,
    is_precision,
    EncodingReport,
    SessionEncoding,
    encoding_report,
    narrower_ranges,
    simulated_error,
    synthetic_inputs,
    synthetic_ranges,
)
from twinfer.protocols.passes.ranges import FAILURE_PROBABILITY, FRACTION_BITS, calibration_ranges, interval_ranges, observed_ranges

from twinfer.parties.errors import InputError, LocalError, ModelError

log = logging.getLogger(__name__)


def parse_model(data: bytes, source: str = "model") -> tuple[Graph, dict[str, np.ndarray]]:
    """Compile serialized ONNX, or an artifact bundle, into the public graph and the server's weights."""
    if af.is_bundle(data):
        try:
            onnx_bytes, manifest, tensors = af.unpack_bundle(data)
            graph, weights = _compile(onnx_bytes, f"{source}/{af.MODEL_FILE}", rewrite=False)  # masks fit the graph as exported
            return af.apply_manifest(graph, manifest, tensors), weights
        except GraphError as err:
            raise ModelError(f"{source}: {err}") from None
    return _compile(data, source, rewrite=True)


def _compile(data: bytes, source: str, rewrite: bool) -> tuple[Graph, dict[str, np.ndarray]]:
    """Serialized ONNX compiled (onnx_import.graph_from_onnx); a ModelError naming `source` if it cannot be."""
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ModelError(f"{source} is not a valid ONNX file: {err}") from None
    if not model.graph.node:
        raise ModelError(f"{source} is not a valid ONNX model: it has no nodes")
    try:
        return graph_from_onnx(model, rewrite=rewrite)
    except GraphError as err:
        raise ModelError(f"{source}: {err}") from None


def read_model_bytes(path: str | Path) -> bytes:
    """The bytes of an ONNX model file or of an artifact directory, with a clear error when it is missing."""
    path = Path(path)
    if af.Artifact.is_artifact(path):
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
        artifact = af.Artifact.read(path)
    except GraphError as err:  # Artifact.read names the directory
        raise ModelError(str(err)) from None
    try:  # the site tensors and any calibration peaks (checked per layer when parsed)
        return artifact.bundle()
    except GraphError as err:
        raise ModelError(f"artifact {path}: {err}") from None


def load_model(path: str | Path) -> tuple[Graph, dict[str, np.ndarray]]:
    return parse_model(read_model_bytes(path), source=str(path))


def load_input(path: str | Path) -> np.ndarray | dict[str, np.ndarray]:
    """A client's input: an array of real numbers saved with numpy.save (one sample per row), or an
    .npz archive (numpy.savez) with one such array per model input, by name (a transformer's
    `input_ids` and its public `attention_mask`)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    if path.is_dir():
        raise InputError(f"input {path} is a directory; expected a .npy file written by numpy.save, or an .npz by numpy.savez")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                arrays = {name: loaded[name] for name in loaded.files}
            if not arrays:
                raise InputError(f"input archive {path} holds no arrays; expected one per model input, by name")
            return {name: check_input_array(a, f"input '{name}' of {path}") for name, a in arrays.items()}
    except ValueError as err:
        raise InputError(f"input file {path} is not a plain .npy array or .npz archive (pickled objects are refused): {err}") from None
    except OSError as err:
        raise InputError(f"input file {path} cannot be read as .npy or .npz: {err}") from None
    return check_input_array(loaded, str(path))


def check_input_array(array: np.ndarray, what: str = "input") -> np.ndarray:
    """A float32 copy of an array of real numbers; an InputError for complex, boolean, text or empty arrays."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{what} holds complex numbers ({array.dtype}); expected real numbers (float or integer)")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{what} holds {array.dtype} values; expected real numbers (float or integer)")
    if array.size == 0:
        raise InputError(f"{what} is empty (shape {array.shape}); expected at least one sample (N x ...)")
    return np.asarray(array, dtype=np.float32)


def _missing_axis(shape: tuple[int, ...], expected: tuple[int, ...]) -> int | None:
    """The axis of `expected` (a sample's shape) whose size-1 dimension `shape[1:]` lacks, if that is all."""
    for axis, size in enumerate(expected):
        if size == 1 and expected[:axis] + expected[axis + 1 :] == tuple(shape[1:]):
            return axis
    return None


def check_input_fits(graph: Graph, inputs: np.ndarray) -> None:
    """Fail before any party starts when the input cannot go through the model."""
    want = f"(N, {', '.join(map(str, graph.input_shape))})"
    if inputs.size == 0:
        raise InputError(f"input is empty (shape {inputs.shape}); expected at least one sample {want}")
    if tuple(inputs.shape) == graph.input_shape:  # one sample without its batch dimension
        raise InputError(f"input has shape {inputs.shape}, one sample without the batch dimension; expected {want}: add it with x[None]")
    axis = _missing_axis(inputs.shape, graph.input_shape)
    if inputs.ndim == len(graph.input_shape) and axis is not None:
        name = "channel dimension" if axis == 0 and len(graph.input_shape) == 3 else f"size-1 dimension {axis + 1}"
        raise InputError(
            f"input has shape {inputs.shape}: {inputs.shape[0]} samples without the {name}; expected {want}: "
            f"add it with np.expand_dims(x, {axis + 1})"
        )
    if tuple(inputs.shape[1:]) != graph.input_shape:
        raise InputError(f"input has shape {inputs.shape}, but the model expects {want}")
    if not np.isfinite(inputs).all():
        raise InputError("input contains NaN or infinite values")
    check_declared_range(graph, inputs)
    try:
        check_ids(graph, inputs)  # an embedding model's input: integer ids in range
    except ValueError as err:
        raise InputError(str(err)) from None


def check_declared_range(graph: Graph, inputs: np.ndarray, origin: str = "") -> None:
    """Refuse inputs outside the model's declared input range (an InputError naming both)."""
    if graph.input_range is None or inputs.size == 0:
        return
    lo, hi = graph.input_range
    low, high = float(np.min(inputs)), float(np.max(inputs))
    if low < lo or high > hi:
        raise InputError(
            f"input values span [{low:.6g}, {high:.6g}], outside the model's declared input range [{lo:.6g}, {hi:.6g}] "
            f"(what its range check assumes); scale the input into that range",
            origin=origin,
        )


def check_held_range(encoding: SessionEncoding, inputs: np.ndarray, origin: str = "") -> None:
    """Refuse inputs outside what the server's model holds at the session's fixed point (an
    InputError before any share is sent: its answer could be wrong)."""
    lo, hi = encoding.input_range
    low, high = float(np.min(inputs)), float(np.max(inputs))
    if low < lo or high > hi:
        raise InputError(
            f"input values span [{low:.6g}, {high:.6g}], outside [{lo:.6g}, {hi:.6g}], what the server's model holds at "
            f"{encoding.fraction_bits} fractional bits ({encoding.chosen or 'its declared input range'}): the answer could be "
            "wrong, so nothing is sent; scale the input into that range, or have the server declare a wider --input-range",
            origin=origin,
        )


def parse_input_range(text: str | None) -> tuple[float, float] | None:
    """--input-range LO,HI as two floats (a ValueError saying what is expected)."""
    if text is None:
        return None
    parts = str(text).split(",")
    try:
        return check_input_range(parts if len(parts) == 2 else [text], "--input-range")
    except GraphError as err:
        raise ValueError(f"{err} (e.g. --input-range 0,1)") from None


def check_output_path(path: str | Path | None) -> None:
    """Before any party starts: the folder of --output exists and is writable, and it names no folder."""
    if path is None:
        return
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise LocalError(f"--output {path} is a directory; expected a file name such as {path / 'logits.npy'}")
    if not folder.is_dir():
        raise LocalError(f"--output {path}: folder {folder} does not exist; create it first or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise LocalError(f"--output {path}: {'the file' if path.exists() else f'folder {folder}'} is not writable by this user")


# -- the numeric range check (protocols/passes/ranges.py, encoding.py) ---------------------------------


def _warn(report: EncodingReport, who: str) -> None:
    if report.warnings:
        log.warning("%s: %s", who, report.message(report.warnings))


def check_inputs_encode(
    graph: Graph, weights: dict[str, np.ndarray], inputs: np.ndarray, fraction_bits: int | str, protocol: str, truncation: str = "auto",
    public: dict[str, np.ndarray] | None = None,
) -> EncodingReport:
    """Before any party starts, where one process holds model and input (twinfer infer, demo):
    what these very inputs (and `public`, their public values) do in every layer, held against the
    session's encoding ('auto': chosen here), the error stated from a simulation of the fixed point
    on them. An InputError naming the layer when refused; warnings are logged."""
    simulated = min(len(inputs), SIMULATED_SAMPLES)
    source = f"these {len(inputs)} inputs" if simulated == len(inputs) else f"these {len(inputs)} inputs (the first {simulated} simulated)"
    seen = observed_ranges(graph, weights, inputs, source=source, public=public)
    error = simulated_error(graph, weights, inputs, protocol, public=public)
    report = encoding_report(graph, weights, seen, fraction_bits, protocol, truncation=truncation, error=error, error_source="simulated")
    if report.refused:
        hint = ""
        if report.suggested_bits is None and any(not is_precision(x) for x in report.refused):
            divisor = _fitting_divisor(graph, weights, inputs, protocol, truncation, public)
            hint = f" (divided by {divisor:g}, these inputs would fit)" if divisor else ""
        raise InputError(f"the input is refused before any share is sent: {report.message()}{hint}")
    _warn(report, "input")
    return report


def _fitting_divisor(
    graph: Graph, weights: dict[str, np.ndarray], inputs: np.ndarray, protocol: str, truncation: str, public: dict[str, np.ndarray] | None
) -> float | None:
    """The smallest power of 2 the inputs divided by would pass the check at some fractional bits
    (the error estimated, not simulated: this is a hint), or None up to 2^60."""
    for k in range(1, 61):
        seen = observed_ranges(graph, weights, inputs / 2.0**k, source="scaled inputs", public=public)
        if not encoding_report(graph, weights, seen, "auto", protocol, truncation=truncation).refused:
            return 2.0**k
    return None


def check_model_range(
    graph: Graph, weights: dict[str, np.ndarray], fraction_bits: int | str, protocol: str, truncation: str = "auto"
) -> tuple[EncodingReport, tuple[float, float]]:
    """The server's check, before it shares anything, and the inputs its model holds: the
    declared range, checked with the artifact's calibration ranges (times their margin) where
    they cover it, else a sound interval bound (with what inputs drawn from the range do for
    the truncations' risk); the error stated from a simulation of the fixed point on such
    inputs. A model that declares no range holds the widest symmetric one its checks accept
    with local truncations (`widest_range`). A ModelError naming the layer when refused."""
    lookup = embedding_node(graph)
    if graph.input_range is None and lookup is None:
        return widest_range(graph, weights, fraction_bits, protocol)
    # A lookup's input is ids: every row of its table, nothing else (check_ids refuses the rest).
    lo, hi = graph.input_range if graph.input_range is not None else (0.0, float(lookup.attrs["rows"] - 1))
    report = _check_range(graph, weights, (lo, hi), fraction_bits, protocol, truncation)
    if report.refused:
        raise ModelError(f"the model is refused for inputs in [{lo:g}, {hi:g}]: {report.message()}")
    _warn(report, "model")
    return report, (lo, hi)


def _check_range(
    graph: Graph, weights: dict[str, np.ndarray], input_range: tuple[float, float], fraction_bits: int | str, protocol: str,
    truncation: str, error: bool = True,
) -> EncodingReport:
    """The check of `input_range` (error: its simulated stated error, else none: a search's step)."""
    calibration = graph.calibration
    lo, hi = input_range
    if calibration is not None and calibration["input_range"][0] <= lo and hi <= calibration["input_range"][1]:
        # what the calibration samples did is what inputs do: its per-op estimate (inputs drawn uniformly
        # from the range drive an optimized model's polynomials far past where they were fitted)
        report = encoding_report(graph, weights, calibration_ranges(graph), fraction_bits, protocol, truncation=truncation)
        return report if error else dataclasses.replace(report, findings=[x for x in report.findings if not is_precision(x)])
    inputs, typical = synthetic_ranges(graph, weights, input_range, SYNTHETIC_SAMPLES if error else SEARCH_SAMPLES)
    ranges = interval_ranges(graph, weights, input_range)  # a sound bound on what every input of the range does
    simulated = simulated_error(graph, weights, inputs, protocol) if error else (lambda bits: 0.0)
    return encoding_report(
        graph, weights, ranges, fraction_bits, protocol, truncation=truncation, error=simulated, error_source="simulated", typical=typical,
    )  # fmt: skip


def server_encoding(
    graph: Graph, weights: dict[str, np.ndarray], fraction_bits: int | str, protocol: str, truncation: str = "auto"
) -> SessionEncoding:
    """What a server tells its clients (check_model_range's verdict), with the error it states for
    narrower ranges too (ERROR_SCALES of the range it holds) where it simulated its stated error,
    which a client picks from by its own input."""
    report, held = check_model_range(graph, weights, fraction_bits, protocol, truncation)
    errors = []
    for lo, hi in narrower_ranges(held) if report.error_source == "simulated" else ():  # one simulation each, of fewer inputs: this is paid at every server start
        inputs = synthetic_inputs(graph, (lo, hi), n=NARROWER_SAMPLES)
        errors.append((lo, hi, simulated_error(graph, weights, inputs, protocol, runs=1)(report.fraction_bits)))
    return dataclasses.replace(SessionEncoding.of(report, held), errors=tuple(errors))


NARROWER_SAMPLES = 16
SEARCH_SAMPLES = 8  # synthetic inputs per step of widest_range's search


WIDEST_LIMITS = (2.0**-8, 2.0**40)  # the symmetric input ranges widest_range tries, |x| up to


def widest_range(graph: Graph, weights: dict[str, np.ndarray], fraction_bits: int | str, protocol: str) -> tuple[EncodingReport, tuple[float, float]]:
    """A model without a declared input range: the widest [-a, a] (to 3 significant digits) at
    which nothing is refused at the session's bits (16 if 'auto') with every truncation local and
    their risk within the limit, so that serving it costs nothing extra. A client's input outside
    it is refused; --input-range declares another (then exact truncations where they pay)."""
    bits = FRACTION_BITS if fraction_bits == "auto" else int(fraction_bits)

    def accepted(a: float) -> bool:  # the outputs' precision is checked once, at the end: it is what costs
        report = _check_range(graph, weights, (-a, a), bits, protocol, "local", error=False)
        return not report.refused and report.failure_probability <= FAILURE_PROBABILITY

    lo, hi = WIDEST_LIMITS
    if not accepted(lo):
        report = _check_range(graph, weights, (-lo, lo), bits, protocol, "local")
        raise ModelError(f"the model declares no input range, and even inputs within +-{lo:g} are refused: {report.message()}")
    a = lo
    while a < hi and accepted(min(a * 4, hi)):  # grow, then bisect the last step
        a = min(a * 4, hi)
    top = min(a * 4, hi)
    for _ in range(4):  # within 10%
        if top / a < 1.1:
            break
        middle = math.sqrt(a * top)
        a, top = (middle, top) if accepted(middle) else (a, middle)
    held = float(f"{a:.3g}") if float(f"{a:.3g}") <= a else float(f"{a * 0.995:.3g}")
    report = _check_range(graph, weights, (-held, held), bits, protocol, "local")
    if report.refused:
        raise ModelError(f"the model declares no input range, and within +-{held:g} its outputs are refused: {report.message()}")
    report.chosen = (report.chosen or f"{bits} fractional bits") + (
        f"; the model declares no input range: it holds [-{held:g}, {held:g}], the widest its checks accept with local truncations"
    )
    return report, (-held, held)
