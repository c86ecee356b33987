"""MOFHEI in the optimizer: one entry point for conversion and block pruning, and the cost report.

    result = optimize_mofhei(model, data, convert="he-friendly", prune_blocks=0.9)
    export_artifact(result.model, example, out_dir, result.manifest)

`result.manifest["mofhei"]["cost_predicted"]` is the report with predictions only. The report
puts, per layer and in total, parameters, secure multiplications, online bytes,
rounds and ReLU/polynomial counts before and after, as predicted by protocols/cost_model.py,
beside what a private run measured when the caller ran one (the optimizer never starts
parties itself: optimizer/ does not import parties/).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from twinfer.optimizer.common.artifact import export_artifact
from twinfer.optimizer.mofhei.block_pruning import (
    BlockPruner,
    PruneConfig,
    check_cullable,
    check_sparsity,
    cull,
    parameter_count,
    train_pruned,
)
from twinfer.optimizer.mofhei.he_friendly import (
    CONVERSIONS,
    ConversionConfig,
    ConversionError,
    Split,
    StageLog,
    convert_he_friendly,
    convert_pooling,
    structure_after_conversion,
)
from twinfer.protocols import artifact as af
from twinfer.protocols.cost_model import FILTER_BLOCKS, BlockShape, LayerCost, graph_cost, total_cost
from twinfer.protocols.ir.graph import Graph
from twinfer.protocols.passes.onnx_import import graph_from_onnx


@dataclass
class MofheiResult:
    """The optimized model (culled when pruned), the training log and manifest fields."""

    model: nn.Module
    stages: list[StageLog] = field(default_factory=list)
    kept_blocks: dict[str, int] = field(default_factory=dict)
    total_blocks: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    cost: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> dict[str, Any]:
        return {
            "mofhei": {
                "stages": [s.__dict__ for s in self.stages],
                "kept_blocks": self.kept_blocks,
                "total_blocks": self.total_blocks,
                "params_before": self.params_before,
                "params_after": self.params_after,
                "cost_predicted": self.cost,
            }
        }


def check_convert(convert: str | None) -> None:
    if convert is not None and convert not in CONVERSIONS:
        raise ConversionError(f"unknown conversion {convert!r}; known: {', '.join(CONVERSIONS)}")


def optimize_mofhei(
    model: nn.Module,
    data: Split,
    *,
    convert: str | None = "he-friendly",
    prune_blocks: float | None = None,
    activations: bool = True,
    block: BlockShape = FILTER_BLOCKS,
    conversion: ConversionConfig | None = None,
    pruning: PruneConfig | None = None,
) -> MofheiResult:
    """Convert and/or block-prune `model` (changed in place; the result's model is culled).

    `activations=False` converts pooling only, for a caller that learns ReLU masks next.
    `prune_blocks` is the constant target sparsity per layer, in [0, 1).
    """
    check_convert(convert)
    if prune_blocks is not None:
        prune_blocks = check_sparsity(prune_blocks)
    if convert is None and prune_blocks is None:
        raise ConversionError("nothing to do: ask for a conversion, block pruning or both")
    result = MofheiResult(model=model, params_before=parameter_count(model))
    example = data.x_train[:2]
    before = model_graph(model, example[:1])
    if prune_blocks is not None:  # refuse a model culling cannot follow before any training
        check_cullable(structure_after_conversion(model, example) if convert and activations else model, example)
    if convert is not None:
        if activations:
            result.stages += convert_he_friendly(model, data, conversion)
        else:
            convert_pooling(model, example)
    if prune_blocks is not None:
        pruner = BlockPruner.for_model(model, prune_blocks, block)
        result.stages += train_pruned(model, data, pruner, pruning)
        result.kept_blocks = pruner.kept()
        result.total_blocks = {n: int(m.weight.shape[0]) for n, m in pruner.layers.items()}
        result.model = cull(model, pruner.masks, example)
    result.params_after = parameter_count(result.model)
    result.cost = cost_report(before, model_graph(result.model, example[:1]), batch=1)
    return result


# -- the report ------------------------------------------------------------------------------------


def model_graph(model: nn.Module, example: torch.Tensor) -> Graph:
    """The compiled graph `model` exports as (sites applied): what the cost model prices."""
    with tempfile.TemporaryDirectory(prefix="twinfer-mofhei-") as tmp:
        export_artifact(model, example, tmp, {})
        return artifact_graph(tmp)


def artifact_graph(path: str | Path) -> Graph:
    """The compiled graph of an artifact directory (or plain .onnx file), sites applied."""
    path = Path(path)
    if path.is_file():
        return graph_from_onnx(onnx.load_from_string(path.read_bytes()))[0]
    return af.Artifact.read(path).graph()


_FIELDS = ("params", "secure_mults", "bytes_online", "rounds", "relu_count", "poly_count")


def _side(costs: list[LayerCost], measured: dict[str, dict] | None) -> dict[str, dict]:
    rows = {}
    for c in costs + [total_cost(costs)]:
        row = {f"{k}_predicted" if k in ("bytes_online", "rounds") else k: getattr(c, k) for k in _FIELDS}
        row |= {"op": c.op, "modelled": c.modelled}
        if measured is not None:
            m = measured.get(c.name) if c.name != "total" else measured.get("total")
            row["bytes_online_measured"] = None if m is None else int(m["bytes_online"])
            row["rounds_measured"] = None if m is None else int(m["rounds"])
        rows[c.name] = row
    return rows


def cost_report(
    before: Graph,
    after: Graph,
    *,
    batch: int = 1,
    measured_before: dict[str, dict] | None = None,
    measured_after: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """Per layer and in total, before and after: predicted costs, and measured where given.

    `measured_*` maps layer names (and "total") to {"bytes_online", "rounds"} of one party
    for one batch of `batch` samples, as a private run counted them.
    """
    b = _side(graph_cost(before, batch), measured_before)
    a = _side(graph_cost(after, batch), measured_after)
    names = list(b) + [n for n in a if n not in b]
    names.remove("total")
    names.append("total")
    return {
        "batch": batch,
        "units": "bytes_online: one party's payload bytes sent + received for the batch; secure_mults: "
        "multiplications of two secret values (Beaver products, squares, the ReLU's final product)",
        "layers": [{"layer": n, "before": b.get(n), "after": a.get(n)} for n in names],
    }


def format_report(report: dict[str, Any]) -> str:
    """A readable table of `cost_report`'s output."""
    head = (
        f"{'layer':<18} {'op':<11} {'params':>15} {'secure mults':>21} {'bytes predicted':>23} "
        f"{'bytes measured':>23} {'ReLU':>11} {'poly':>13}"
    )
    lines = [f"batch {report['batch']}; each cell: before -> after", head, "-" * len(head)]

    def pair(row_b, row_a, key):
        def one(r):
            if r is None:
                return "-"
            v = r.get(key)
            return "?" if v is None else f"{v:,}"

        return f"{one(row_b)} -> {one(row_a)}"

    for entry in report["layers"]:
        rb, ra = entry["before"], entry["after"]
        op = (rb or ra)["op"]
        lines.append(
            f"{entry['layer']:<18} {op:<11} {pair(rb, ra, 'params'):>15} {pair(rb, ra, 'secure_mults'):>21} "
            f"{pair(rb, ra, 'bytes_online_predicted'):>23} {pair(rb, ra, 'bytes_online_measured'):>23} "
            f"{pair(rb, ra, 'relu_count'):>11} {pair(rb, ra, 'poly_count'):>13}"
        )
    return "\n".join(lines)
