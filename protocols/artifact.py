"""The optimizer's artifact: what it holds and the checks a reader runs before trusting it.

An artifact is a directory:

    model.onnx            the network, standard ONNX ops (a masked site exports as Relu)
    tensors.safetensors   public per-site structure: activation/<node>/mask, .../coeffs
    calibration_peaks.safetensors   (with calibration) per node, the calibration samples'
                          per-element peak |value| of its output (float32, one sample's shape,
                          before the margin): the server's error estimate; older artifacts lack it
    manifest.json         counts, accuracies, data set, seed, versions, file digests

The optimizer writes it and the server reads it, both through `Artifact` (the one place that
opens these files), so both sides agree on one format and every read checks the digests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .ir.graph import Graph, GraphError, check_input_range
from .passes.ranges import ranges_from_summary
from .ops.activation import ActivationSite, apply_sites
from .ops.registry import check_comparison_bits, op_for

FORMAT = "twinfer-artifact"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
PEAKS_FILE = "calibration_peaks.safetensors"
_SITE_PREFIX = "activation/"
_PEAKS_PREFIX = "calibration/"  # the peaks' names in a bundle, beside the site tensors


class ArtifactError(GraphError):
    """The artifact is incomplete, tampered with, or inconsistent with its model."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def site_tensors(sites: dict[str, ActivationSite]) -> dict[str, np.ndarray]:
    """Flatten sites into named arrays for a safetensors file."""
    out = {}
    for node, site in sites.items():
        out[f"{_SITE_PREFIX}{node}/mask"] = np.ascontiguousarray(site.mask, dtype=np.uint8)
        out[f"{_SITE_PREFIX}{node}/coeffs"] = np.ascontiguousarray(site.coeffs, dtype=np.float32)
    return out


def sites_from_tensors(manifest: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, ActivationSite]:
    """Rebuild the sites the manifest lists; every listed site needs both arrays, nothing extra."""
    listed = manifest.get("activations", [])
    if not isinstance(listed, list):
        raise ArtifactError("manifest 'activations' must be a list")
    sites: dict[str, ActivationSite] = {}
    for entry in listed:
        node = entry.get("node") if isinstance(entry, dict) else None
        if not isinstance(node, str):
            raise ArtifactError(f"manifest activation entry {entry!r} has no node name")
        try:
            mask, coeffs = tensors[f"{_SITE_PREFIX}{node}/mask"], tensors[f"{_SITE_PREFIX}{node}/coeffs"]
        except KeyError as err:
            raise ArtifactError(f"{TENSORS_FILE} lacks {err.args[0]} for the site the manifest lists") from None
        if mask.dtype != np.uint8 or not np.isin(mask, (0, 1)).all():
            raise ArtifactError(f"mask of '{node}' must hold only 0 and 1 (uint8)")
        sites[node] = ActivationSite(mask=mask.astype(bool), coeffs=coeffs.astype(np.float32))
    extra = sorted(k for k in tensors if k.startswith(_SITE_PREFIX) and k[len(_SITE_PREFIX) :].rsplit("/", 1)[0] not in sites)
    if extra:
        raise ArtifactError(f"{TENSORS_FILE} holds site arrays the manifest does not list: {extra}")
    return sites


def check_manifest(manifest: Any, files: dict[str, bytes]) -> None:
    """Format, version and the digests of the files beside it."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{MANIFEST_FILE} is not a twinfer artifact manifest (format must be '{FORMAT}')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {manifest.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    digests = manifest.get("sha256", {})
    for name, data in files.items():
        if digests.get(name) != digest(data):
            raise ArtifactError(f"{name} does not match the digest in {MANIFEST_FILE}: the artifact was modified")


def artifact_files(manifest: Any) -> tuple[str, ...]:
    """The files beside the manifest that a reader loads and checks against its digests."""
    ranges = manifest.get("activation_ranges") if isinstance(manifest, dict) else None
    named = ranges.get("peaks_file") if isinstance(ranges, dict) else None
    if named is None:  # no calibration, or an artifact written before the peaks were stored
        return (MODEL_FILE, TENSORS_FILE)
    if named != PEAKS_FILE:  # a fixed name: a manifest never points a reader at another path
        raise ArtifactError(f"{MANIFEST_FILE} 'activation_ranges' names peaks file {named!r}; expected '{PEAKS_FILE}'")
    return (MODEL_FILE, TENSORS_FILE, PEAKS_FILE)


def artifact_tensors(manifest: Any, files: dict[str, bytes]) -> dict[str, np.ndarray]:
    """From the bytes of `artifact_files`, digests checked: the site tensors and, where the artifact
    stores them, its calibration peaks under their bundle names (what `apply_manifest` takes)."""
    check_manifest(manifest, files)
    tensors = _load(files[TENSORS_FILE], TENSORS_FILE)
    if any(k.startswith(_PEAKS_PREFIX) for k in tensors):
        raise ArtifactError(f"{TENSORS_FILE} holds arrays named {_PEAKS_PREFIX}...; calibration peaks belong in {PEAKS_FILE}")
    if PEAKS_FILE in files:
        tensors |= {_PEAKS_PREFIX + k: v for k, v in _load(files[PEAKS_FILE], PEAKS_FILE).items()}
    return tensors


def _load(data: bytes, name: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        return load(data)
    except Exception as err:  # safetensors raises its own error types for a corrupt file
        raise ArtifactError(f"{name} is not a valid safetensors file: {err}") from None


def apply_manifest(graph: Graph, manifest: dict[str, Any], tensors: dict[str, np.ndarray]) -> Graph:
    """The graph with the artifact's masked sites; its ReLU count must equal the manifest's."""
    sites = sites_from_tensors(manifest, tensors)
    try:
        masked = apply_sites(graph, sites)
    except ArtifactError:
        raise
    except GraphError as err:
        raise ArtifactError(str(err)) from None
    for entry in manifest["activations"]:  # shapes fit (checked above); now each site's count
        if entry.get("kept") != sites[entry["node"]].kept:
            raise ArtifactError(f"site '{entry['node']}' keeps {sites[entry['node']].kept} ReLUs, but the manifest says {entry.get('kept')}")
    if masked.relu_count() != manifest.get("relu_count"):
        raise ArtifactError(
            f"the model keeps {masked.relu_count()} ReLUs per sample, but the manifest says {manifest.get('relu_count')}"
        )
    return apply_calibration(apply_comparison_bits(masked, manifest.get("comparison_bits", {})), manifest, tensors)


def apply_calibration(graph: Graph, manifest: dict[str, Any], tensors: dict[str, np.ndarray] | None = None) -> Graph:
    """The manifest's declared input range (public: the client checks it) and the layer ranges
    its calibration samples reached, with their per-element peaks where `tensors` (from
    `artifact_tensors`) has them (the server's range check; never sent to the client)."""
    if "input_range" in manifest:
        graph.input_range = check_input_range(manifest["input_range"], f"{MANIFEST_FILE} 'input_range'")
    ranges = manifest.get("activation_ranges")
    if ranges is None:
        return graph
    if graph.input_range is None or not isinstance(ranges, dict) or not isinstance(ranges.get("layers"), dict):
        raise ArtifactError(f"{MANIFEST_FILE} 'activation_ranges' needs 'layers' (per node) and an 'input_range' beside it")
    source = f"calibration: {ranges.get('samples', '?')} samples x margin {ranges.get('margin', '?')}"
    peaks = _calibration_peaks(graph, tensors or {}) if "peaks_file" in ranges else None
    ranges_from_summary(graph, ranges["layers"], graph.input_range, source, peaks)  # every layer present and numeric
    graph.calibration = {"layers": ranges["layers"], "source": source, "input_range": graph.input_range}
    if peaks is not None:
        graph.calibration["peaks"] = peaks
    return graph


def _calibration_peaks(graph: Graph, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per node, its stored peaks: float32, its output's shape, finite and >= 0; nothing else."""
    stored = {k[len(_PEAKS_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_PEAKS_PREFIX)}
    peaks = {}
    for node in graph.nodes:
        array, shape = stored.pop(node.name, None), tuple(node.attrs["out_shape"])
        if array is None:
            raise ArtifactError(f"{PEAKS_FILE} lacks the peaks of layer '{node.name}', which the manifest's calibration covers")
        if array.dtype != np.float32 or tuple(array.shape) != shape:
            raise ArtifactError(
                f"{PEAKS_FILE}: the peaks of layer '{node.name}' are {array.dtype} of shape {tuple(array.shape)}; "
                f"expected float32 of shape {shape} (the layer's output)"
            )
        if not np.isfinite(array).all() or (array < 0).any():
            raise ArtifactError(f"{PEAKS_FILE}: the peaks of layer '{node.name}' must be finite magnitudes (>= 0)")
        peaks[node.name] = array
    if stored:
        raise ArtifactError(f"{PEAKS_FILE} holds peaks of layers the model lacks: {sorted(stored)[:3]}")
    return peaks


def apply_comparison_bits(graph: Graph, widths: Any) -> Graph:
    """The graph with each named comparison compared on the artifact's width (public structure)."""
    if not isinstance(widths, dict):
        raise ArtifactError(f"manifest 'comparison_bits' must map node names to widths, got {type(widths).__name__}")
    by_name = {n.name: n for n in graph.nodes}
    for name, bits in widths.items():
        node = by_name.get(name)
        if node is None or not op_for(node).compares:
            raise ArtifactError(f"manifest 'comparison_bits' names '{name}', which is not a comparison in the model")
        node.attrs["bits"] = bits
        try:
            check_comparison_bits(node)
        except GraphError as err:
            raise ArtifactError(str(err)) from None
    return graph


# -- one blob for the wire between launcher and server: safetensors, never pickle -------------

_ONNX_KEY = "__model_onnx__"
_MANIFEST_KEY = "__manifest_json__"


def is_bundle(data: bytes) -> bool:
    """A safetensors blob starts with an 8-byte header length and then a JSON object."""
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data)


def pack_bundle(onnx_bytes: bytes, manifest: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    """The artifact's three parts in one safetensors blob."""
    from safetensors.numpy import save

    arrays = dict(tensors)
    arrays[_ONNX_KEY] = np.frombuffer(onnx_bytes, dtype=np.uint8)
    arrays[_MANIFEST_KEY] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    return save(arrays)


def unpack_bundle(data: bytes) -> tuple[bytes, dict[str, Any], dict[str, np.ndarray]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        arrays = load(data)
        onnx_bytes = arrays.pop(_ONNX_KEY).tobytes()
        manifest = json.loads(arrays.pop(_MANIFEST_KEY).tobytes())
    except (SafetensorError, KeyError, ValueError) as err:
        raise ArtifactError(f"not a twinfer model bundle: {err}") from None
    return onnx_bytes, manifest, arrays


# -- the artifact as a value: the one reader and writer of its directory ----------------------

_FORMAT_KEYS = ("format", "format_version", "sha256")


@dataclass
class Artifact:
    """An artifact's manifest and the bytes of the files beside it (MODEL_FILE, TENSORS_FILE and,
    with calibration, PEAKS_FILE). `create` fills the format fields and digests, `read` checks
    them, `with_sections` adds a method's manifest section, `write` puts it on disk."""

    manifest: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def create(cls, manifest: dict[str, Any], onnx_bytes: bytes, tensors: bytes, peaks: bytes | None = None) -> "Artifact":
        files = {MODEL_FILE: onnx_bytes, TENSORS_FILE: tensors} | ({PEAKS_FILE: peaks} if peaks is not None else {})
        if peaks is not None:
            named = (manifest.get("activation_ranges") or {}).get("peaks_file")
            if named != PEAKS_FILE:
                raise ArtifactError(f"an artifact with calibration peaks needs 'activation_ranges.peaks_file' = '{PEAKS_FILE}'")
        full = {k: v for k, v in manifest.items() if k not in _FORMAT_KEYS}
        full |= {"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": {name: digest(data) for name, data in files.items()}}
        return cls(full, files)

    @staticmethod
    def is_artifact(path: str | Path) -> bool:
        """A directory with a manifest: what `read` takes (a plain .onnx file is not an artifact)."""
        return Path(path).is_dir() and (Path(path) / MANIFEST_FILE).is_file()

    @classmethod
    def read(cls, path: str | Path) -> "Artifact":
        """The artifact in directory `path`, its format, version and digests checked; an
        ArtifactError that names the directory and what is wrong."""
        path = Path(path)
        try:
            return cls._read(path)
        except ArtifactError as err:
            raise ArtifactError(f"artifact {path}: {err}") from None

    @classmethod
    def _read(cls, path: Path) -> "Artifact":
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{MANIFEST_FILE} cannot be read as JSON: {err}") from None
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{MANIFEST_FILE} is not a twinfer artifact manifest (a JSON object)")
        files = {}
        for name in artifact_files(manifest):
            if not (path / name).is_file():
                raise ArtifactError(f"lacks {name}")
            files[name] = (path / name).read_bytes()
        artifact = cls(manifest, files)
        artifact.verify()
        return artifact

    def verify(self) -> None:
        """Format, version and every file's digest (an ArtifactError names what does not match)."""
        if set(self.files) != set(artifact_files(self.manifest)):
            raise ArtifactError(f"the artifact holds {sorted(self.files)}; its manifest lists {sorted(artifact_files(self.manifest))}")
        check_manifest(self.manifest, self.files)

    @property
    def onnx_bytes(self) -> bytes:
        return self.files[MODEL_FILE]

    def tensors(self) -> dict[str, np.ndarray]:
        """The tensors file's arrays and any calibration peaks under their bundle names (digests checked)."""
        return artifact_tensors(self.manifest, self.files)

    def with_sections(self, **sections: Any) -> "Artifact":
        """The same files with these manifest sections added or replaced (the format fields are not sections)."""
        reserved = sorted(set(sections) & set(_FORMAT_KEYS))
        if reserved:
            raise ArtifactError(f"{reserved} are the artifact's format fields, not a method's section")
        return Artifact(self.manifest | sections, dict(self.files))

    def write(self, path: str | Path) -> Path:
        """The files and the manifest into directory `path` (made if missing); returns it."""
        self.verify()
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / PEAKS_FILE).unlink(missing_ok=True)  # a rewrite without calibration leaves no stale peaks
        for name, data in self.files.items():
            (out / name).write_bytes(data)
        (out / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2) + "\n")
        return out

    def bundle(self) -> bytes:
        """The artifact as one blob for the wire (safetensors, never pickle)."""
        return pack_bundle(self.onnx_bytes, self.manifest, self.tensors())

    def graph(self) -> Graph:
        """The compiled graph the artifact describes: its sites, widths and calibration applied."""
        import onnx

        from .passes.onnx_import import graph_from_onnx

        graph, _ = graph_from_onnx(onnx.load_from_string(self.onnx_bytes), rewrite=False)
        return apply_manifest(graph, self.manifest, self.tensors())
