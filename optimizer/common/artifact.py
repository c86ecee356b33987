"""Writing the optimizer's artifact directory (format: protocols/artifact.py).

`write_artifact` takes ONNX bytes and public per-site tensors; `export_artifact` takes a torch
model whose activation sites are modules with a `site()` method (masked ReLUs, polynomial
activations) and maps each site to the Relu node it exports as.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.numpy import save
from torch import nn

from twinfer.optimizer.common.hooks import run_hooked
from twinfer.protocols import artifact as af
from twinfer.protocols.passes.onnx_import import graph_from_onnx
from twinfer.protocols.passes.ranges import observed_ranges, widths_from_ranges
from twinfer.protocols.passes.onnx_export import export_onnx
from twinfer.protocols.ops.activation import ActivationSite, apply_sites


def twinfer_version() -> str:
    try:
        return version("twinfer")
    except PackageNotFoundError:
        return "unknown"


def write_artifact(
    out_dir: str | Path,
    onnx_bytes: bytes,
    manifest: dict[str, Any],
    tensors: dict[str, np.ndarray] | None = None,
    sites: dict[str, ActivationSite] | None = None,
    calibration: np.ndarray | None = None,
    margin: float = 4.0,
    widths: bool = True,
) -> Path:
    """Write model.onnx, tensors.safetensors and manifest.json (and, with calibration,
    calibration_peaks.safetensors); returns the directory.

    The manifest gets the format fields, the twinfer version, the sites it lists, the
    per-sample ReLU count of the compiled model and the files' digests. The model is compiled
    once here, so an artifact that would not load is never written. With `calibration`
    samples, the manifest declares their range as the model's input range and records what
    they did in every layer, times `margin` (the server's range check; protocols/passes/ranges.py),
    and their per-element peaks before the margin (its error estimate) in a file of their own;
    with `widths` too, each comparison gets the narrowest width that holds `margin` times the
    largest value it compared on them, for backends that use it.
    """
    sites = sites or {}
    graph, weights = graph_from_onnx(onnx.load_from_string(onnx_bytes), rewrite=False)
    masked = apply_sites(graph, sites)
    arrays = dict(tensors or {}) | af.site_tensors(sites)
    peaks = None
    if calibration is not None:
        fragment, peak_arrays = _calibration(masked, weights, calibration, margin, widths)
        manifest = dict(manifest) | fragment
        peaks = save(peak_arrays)
    sections = dict(manifest) | {
        "twinfer_version": twinfer_version(),
        "relu_count": masked.relu_count(),
        "activations": [
            {"node": name, "kept": site.kept, "elements": int(site.mask.size)} for name, site in sites.items()
        ],
    }
    return af.Artifact.create(sections, onnx_bytes, save(arrays), peaks).write(out_dir)


def is_site(module: nn.Module) -> bool:
    """An activation site: a module that can describe itself as a mask and coefficients."""
    return callable(getattr(module, "site", None)) and hasattr(module, "export_as_relu")


@contextlib.contextmanager
def _sites_as_relu(model: nn.Module) -> Iterator[None]:
    sites = [m for m in model.modules() if is_site(m)]
    for m in sites:
        m.export_as_relu = True
    try:
        yield
    finally:
        for m in sites:
            m.export_as_relu = False


def _activation_order(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """ReLU-like modules in the order a forward pass calls them (the exporter's node order)."""
    order: list[nn.Module] = []
    activations = [m for m in model.modules() if is_site(m) or isinstance(m, nn.ReLU)]
    run_hooked(model, example, activations, lambda mod, _i, _o: order.append(mod))
    return order


def _calibration(graph, weights, calibration: np.ndarray, margin: float, widths: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest's calibration fields, and the per-element peaks for af.PEAKS_FILE."""
    observed = observed_ranges(graph, weights, calibration)
    out: dict[str, Any] = {
        "input_range": [float(np.min(calibration)), float(np.max(calibration))],
        "activation_ranges": {
            "samples": int(len(calibration)),
            "margin": margin,
            "layers": observed.scaled(margin).layer_summary(graph),
            "peaks_file": af.PEAKS_FILE,
            "risk": f"the server checks the fixed-point encoding against {margin:g} x what these samples did in each "
            "layer; an input inside input_range that drives a layer past that is not caught before it runs",
        },
    }
    peaks = observed.layer_peaks(graph)
    if not widths:
        return out, peaks
    return out | {
        "comparison_bits": widths_from_ranges(graph, observed.compared, margin),
        "comparison_calibration": {
            "samples": int(len(calibration)),
            "margin": margin,
            "largest_compared": {k: round(v, 6) for k, v in observed.compared.items()},
            "risk": f"a comparison on n bits is exact while |value| < 2^(n-17); an input that drives a layer past "
            f"{margin:g} x the largest value its calibration samples did there can be compared wrongly, undetected",
        },
    }, peaks


def export_artifact(
    model: nn.Module,
    example: torch.Tensor,
    out_dir: str | Path,
    manifest: dict[str, Any],
    calibration: np.ndarray | None = None,
    margin: float = 4.0,
    widths: bool = True,
) -> Path:
    """Export `model` (eval mode) with its sites as masked activations, and write the artifact."""
    was_training = model.training
    model.eval()
    try:
        with _sites_as_relu(model):
            order = _activation_order(model, example)
            onnx_bytes = export_onnx(model, example)
    finally:
        model.train(was_training)
    relu_nodes = [n.name for n in onnx.load_from_string(onnx_bytes).graph.node if n.op_type == "Relu"]
    if len(relu_nodes) != len(order):
        raise ValueError(
            f"the exported model has {len(relu_nodes)} Relu nodes but the forward pass called {len(order)} "
            "ReLU/site modules; use nn.ReLU or site modules, not torch.relu in forward"
        )
    sites = {node: m.site() for node, m in zip(relu_nodes, order) if is_site(m)}
    return write_artifact(out_dir, onnx_bytes, manifest, sites=sites, calibration=calibration, margin=margin, widths=widths)
