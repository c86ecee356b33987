"""Predicted latency of one private inference, per layer: the link's share plus local compute.

    latency_s(layer) = rounds * rtt/2 + bytes of the busier direction / bandwidth     (the link)
                     + s_per_byte * bytes_online + s_per_round * rounds
                       + s_per_comparison * comparisons                               (compute)
    latency_s(model) = sum over layers + s_per_inference

The link term is protocols/cost_model.link_time_s on the backend's priced rounds and bytes,
the formula parties' NetworkProfile.lower_bound_s uses too. Measured wan runs come in 1.1-1.3x
above that bound alone: the parties' own work (ring arithmetic, serialising, DCF evaluation on
fss) adds time that does not shrink with the link. So "predicted" adds a compute term, linear
in the same per-layer counts, whose coefficients are measured: fitted to what a session of a
model under the link spent in each layer beyond the link's share (`ComputeModel.fit`; `twinfer
optimize --calibrate-compute` runs one), or the defaults below, measured on a 2-core
development machine.
With `keys_over_link` (a dealer the client reaches over the same link, as in a deployment
where the dealer is not beside it), a batch also waits for the client's correlations: half of
the dealer's priced offline bytes (one ReLU key per party; measured: 23.28 of 46.61 MB per
LeNet-5 inference on fss), which stream while the previous batch runs, so a model takes at
least their transfer time: latency_s = max(the sum above, offline bytes / 2 / bandwidth).
The optimizer never starts parties itself (it does not import parties/): the caller passes the
link's numbers and, when calibrated, the measured layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from twinfer.protocols.cost_model import LayerCost, bytes_one_way, graph_cost, link_time_s, total_cost
from twinfer.protocols.ir.graph import Graph

_FEATURES = ("bytes_online", "rounds", "comparisons")


@dataclass(frozen=True)
class ComputeModel:
    """Seconds of local work per online byte, per round and per comparison, plus per inference."""

    s_per_byte: float = 0.0
    s_per_round: float = 0.0
    s_per_comparison: float = 0.0
    s_per_inference: float = 0.0
    source: str = "none: the link's lower bound only"

    def layer_s(self, cost: LayerCost) -> float:
        return self.s_per_byte * cost.bytes_online + self.s_per_round * cost.rounds + self.s_per_comparison * cost.comparisons

    @classmethod
    def fit(cls, costs: list[LayerCost], measured: dict[str, dict], batch_latency_s: float, source: str) -> "ComputeModel":
        """Non-negative least squares of the measured wall time (per batch, under the link) beyond the
        link's share, on the counts, per stretch of layers that ends in a comparison.

        `measured` maps layer names to {"wall_s": seconds per batch beyond the layer's link share}.
        Stretches, not layers: a layer's message is often waited for in the next layer (a conv's
        opening in the ReLU after it), so one layer looks faster than its link share and the next
        slower by as much, which non-negative coefficients cannot fit layer by layer. What the
        batch took beyond the priced layers (sharing the input, the dealer's bookkeeping) becomes
        the per-inference constant.
        """
        from scipy.optimize import nnls

        stretches = _stretches([c for c in costs if c.name in measured])
        if len(stretches) < len(_FEATURES):
            raise ValueError(f"a compute fit needs at least {len(_FEATURES)} measured stretches of layers (each ending in a comparison), got {len(stretches)}")
        a = np.array([[float(sum(getattr(c, f) for c in run)) for f in _FEATURES] for run in stretches])
        b = np.array([float(sum(measured[c.name]["wall_s"] for c in run)) for run in stretches])
        scale = np.where(a.max(0) > 0, a.max(0), 1.0)  # columns of similar size: nnls is scale-sensitive
        coef, _ = nnls(a / scale, b)
        coef = coef / scale
        rest = max(0.0, batch_latency_s - float((a @ coef).sum()))
        return cls(float(coef[0]), float(coef[1]), float(coef[2]), rest, source)


def _stretches(costs: list[LayerCost]) -> list[list[LayerCost]]:
    """`costs` (graph order) cut after every layer with comparisons; the layers after the last one form the last stretch."""
    out: list[list[LayerCost]] = [[]]
    for c in costs:
        out[-1].append(c)
        if c.comparisons:
            out.append([])
    return [run for run in out if run]


# Fitted by `twinfer optimize --calibrate-compute` (ComputeModel.fit on one session under wan:
# each stretch of layers' median time over the batches after the first, beyond its share of the
# link) to latency_budget.py's LeNet-5, batch 1, 6 batches, the mean of two sessions, on the
# 2-core development machine; another machine or link should calibrate its own. They predict
# ResNetFMNIST's base model within 4% too (crypten 2.44 s for 2.45 measured, fss 0.50 for 0.48).
DEFAULT_COMPUTE: dict[str, ComputeModel] = {
    "crypten": ComputeModel(0.0, 1.95e-3, 0.0, 1.2e-3, "defaults measured under wan on a 2-core development machine (crypten)"),
    "fss": ComputeModel(0.0, 2.37e-3, 1.99e-6, 6.3e-3, "defaults measured under wan on a 2-core development machine (fss)"),
    # not fitted yet: fss's figures, which its ReLU's one-bit comparison and select undercut
    "fss-compact": ComputeModel(0.0, 2.37e-3, 1.99e-6, 6.3e-3, "fss's defaults, not yet fitted for fss-compact: calibrate (--calibrate-compute)"),
}


@dataclass(frozen=True)
class LatencyModel:
    """One backend on one link: what a layer and a model are predicted to cost."""

    protocol: str
    network: str  # the profile's name, for the manifest
    rtt_s: float
    bandwidth_bps: float | None
    compute: ComputeModel = ComputeModel()
    keys_over_link: bool = False  # the dealer's correlations reach the client over this link too

    def layers(self, graph: Graph, batch: int = 1) -> list[dict[str, Any]]:
        """Per layer (the cost model's, output opening last): counts, link, compute and latency seconds."""
        return [self._row(c) for c in graph_cost(graph, batch, self.protocol)]

    def _row(self, c: LayerCost) -> dict[str, Any]:
        link = link_time_s(c.rounds, bytes_one_way(c), self.rtt_s, self.bandwidth_bps)
        compute = self.compute.layer_s(c)
        return {
            "layer": c.name, "op": c.op, "rounds": c.rounds, "bytes_online": c.bytes_online, "bytes_one_way": bytes_one_way(c),
            "bytes_offline": c.bytes_offline, "relu_count": c.relu_count, "comparisons": c.comparisons,
            "link_s": link, "compute_s": compute, "latency_s": link + compute,
        }  # fmt: skip

    def latency_s(self, graph: Graph) -> float:
        """Predicted seconds of one inference of one sample."""
        return self.seconds(graph_cost(graph, 1, self.protocol))

    def seconds(self, costs: list[LayerCost]) -> float:
        """Predicted seconds of the cost model's layers (one inference)."""
        online = sum(self._row(c)["latency_s"] for c in costs) + self.compute.s_per_inference
        return max(online, self.offline_link_s(costs)) if self.keys_over_link else online

    def offline_link_s(self, costs: list[LayerCost]) -> float:
        """Seconds the client's half of the dealer's bytes take over the link (0 where unpriced or unlimited)."""
        offline = [c.bytes_offline for c in costs]
        if self.bandwidth_bps is None or any(b is None for b in offline):
            return 0.0
        return sum(offline) / 2 * 8 / self.bandwidth_bps

    def report(self, graph: Graph) -> dict[str, Any]:
        """The manifest's `cost_predicted`: every layer and the total, batch 1, labelled as predicted."""
        costs = graph_cost(graph, 1, self.protocol)
        rows = [self._row(c) for c in costs]
        total = total_cost(costs)
        return {
            "predicted": True,
            "protocol": self.protocol,
            "network": self.network,
            "rtt_s": self.rtt_s,
            "bandwidth_bps": self.bandwidth_bps,
            "batch": 1,
            "compute": asdict(self.compute),
            "keys_over_link": self.keys_over_link,
            "formula": "latency_s = rounds * rtt/2 + bytes_one_way * 8 / bandwidth + compute_s per layer, "
            "plus compute.s_per_inference once"
            + ("; at least offline_link_s (the client's half of the dealer's bytes over the link)" if self.keys_over_link else ""),
            "layers": rows,
            "total": {
                "rounds": total.rounds,
                "bytes_online": total.bytes_online,
                "bytes_one_way": sum(r["bytes_one_way"] for r in rows),
                "bytes_offline": total.bytes_offline,
                "relu_count": total.relu_count,
                "comparisons": total.comparisons,
                "link_s": sum(r["link_s"] for r in rows),
                "compute_s": sum(r["compute_s"] for r in rows) + self.compute.s_per_inference,
                "offline_link_s": self.offline_link_s(costs),
                "latency_s": self.seconds(costs),
            },
        }
