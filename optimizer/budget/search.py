"""Optimize what the user pays for: the most accurate model whose predicted latency (and bytes) fit a budget.

A candidate is a structure and a ReLU budget:
- which max-pools become average pools (MOFHEI's conversion, pooling only: local under
  secret sharing, where a 2x2 max-pool costs 46 rounds on crypten, 2 on fss);
- how much block pruning (`sparsities`, with --prune-blocks: removes filters, their
  activations and the next layer's inputs);
- which ReLU sites become polynomials everywhere: a site that keeps even one ReLU pays a
  comparison's rounds (9 on crypten), which on a wan link can cost more than its bytes; each
  pooling and pruning choice is planned with every site live and, when it lets AutoReP keep
  more ReLUs, with the set of whole-polynomial sites that lets it keep the most (every subset
  of a few sites, else the largest k sites): training decides which of the two is better;
- with `linearize`, which ReLU sites are dropped (the identity: DeepReDuce's ReLU dropping): a
  polynomial still costs a Beaver square, one round and its bytes (on fss as much online as
  the ReLU it replaces), a dropped site nothing; planned like the polynomial sites (the set
  that lets AutoReP keep the most ReLUs elsewhere, one site at least staying non-linear; of
  equally priced sets, the one whose ReLUs remove the least of their inputs' energy on training
  samples), a third plan per structure, which the ReLU budget alone cannot reach;
- how many ReLUs AutoReP may keep: the most for which the structure's predicted latency under
  the backend's cost model and the link still fits (a binary search; every site that may keep
  ReLUs is charged the rounds of both its ReLU and its polynomial, so the trained model can
  only come in under the estimate).

Every structure is priced before any training (protocols/cost_model.py via
optimizer/budget/latency.py); a budget below the cheapest structure is refused at once, with
that latency. Of the structures that fit, up to `max_candidates` are trained (evenly spread
over how many of their ReLUs they keep, so both ends of the trade are tried), each by the one
AutoReP pipeline with distillation from the original model, and the one with the best
validation accuracy whose exact predicted latency (priced from its own exported graph) fits
and whose artifact the server's numeric-range check accepts (polynomials in place of ReLUs
can drive later layers past what the fixed point holds) is returned.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from twinfer.optimizer.autorep.autorep import AutoRepConfig, BudgetError, optimize_relus
from twinfer.optimizer.common.artifact import export_artifact
from twinfer.optimizer.common.hooks import run_hooked
from twinfer.optimizer.mofhei.block_pruning import PruneConfig, blocks_to_keep
from twinfer.optimizer.mofhei.he_friendly import FitConfig, Split, avg_pool_like, forward_order, set_module
from twinfer.optimizer.mofhei.mofhei import artifact_graph, model_graph, optimize_mofhei
from twinfer.protocols.backends.base import AUTO
from twinfer.protocols.cost_model import graph_cost, prunable_layers, pruned_graph, total_cost
from twinfer.protocols.ir.graph import Graph
from twinfer.protocols.passes.onnx_import import graph_from_onnx
from twinfer.protocols.passes.encoding import encoding_report
from twinfer.protocols.passes.ranges import calibration_ranges
from twinfer.protocols.ops.activation import ActivationSite, apply_sites

from .latency import LatencyModel

_log = logging.getLogger(__name__)
EXHAUSTIVE_POOLS = 4  # up to this many max-pools every subset is a structure; beyond, the last k (MOFHEI's order)
EXHAUSTIVE_SITES = 6  # up to this many ReLU sites every subset may be all-polynomial; beyond, the largest k
DROPPED_SITES = 2  # beyond EXHAUSTIVE_SITES sites, at most this many are dropped together
DAMAGE_SAMPLES = 256  # training samples that rank equally priced sites to drop


class LatencyBudgetError(ValueError):
    """No structure the search may build fits the budget; names the cheapest predicted cost."""


@dataclass(frozen=True)
class Budget:
    """At most `latency_s` predicted seconds and/or `bytes_online` bytes per inference of one sample."""

    latency_s: float | None = None
    bytes_online: int | None = None

    def __post_init__(self) -> None:
        if self.latency_s is None and self.bytes_online is None:
            raise ValueError("a budget needs --latency-budget and/or --bytes-budget")
        if self.latency_s is not None and not (self.latency_s > 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"--latency-budget must be a positive number of seconds, got {self.latency_s}")
        if self.bytes_online is not None and self.bytes_online <= 0:
            raise ValueError(f"--bytes-budget must be a positive number of bytes, got {self.bytes_online}")

    def fits(self, latency_s: float, bytes_online: int) -> bool:
        return (self.latency_s is None or latency_s <= self.latency_s) and (self.bytes_online is None or bytes_online <= self.bytes_online)


@dataclass
class Candidate:
    """One structure and the ReLUs it may keep, as priced before training."""

    pools: tuple[str, ...]  # max-pool modules converted to average pools
    sparsity: float  # block-pruning target per layer (0: none)
    polynomial_sites: tuple[int, ...]  # ReLU sites (forward order) that keep no ReLU at all
    relu_budget: int
    relu_total: int
    estimate_latency_s: float  # an upper estimate, before training
    estimate_bytes_online: int
    val_accuracy: float | None = None
    latency_s: float | None = None  # exact, from the trained model's own graph
    bytes_online: int | None = None
    relu_count: int | None = None
    error: str | None = None
    identity_sites: tuple[int, ...] = ()  # ReLU sites (forward order) dropped: the identity, no secure op

    @property
    def kept_fraction(self) -> float:
        return self.relu_budget / max(self.relu_total, 1)

    def describe(self) -> str:
        pools = f"max-pool {', '.join(self.pools)} -> average" if self.pools else "max-pools kept"
        prune = f", {self.sparsity:.0%} of blocks pruned" if self.sparsity else ""
        poly = f", ReLU sites {list(self.polynomial_sites)} all polynomial" if self.polynomial_sites else ""
        dropped = f", ReLU sites {list(self.identity_sites)} dropped" if self.identity_sites else ""
        return f"{pools}{prune}{poly}{dropped}, at most {self.relu_budget} of {self.relu_total} ReLUs"


@dataclass
class SearchResult:
    model: nn.Module
    chosen: Candidate
    candidates: list[Candidate] = field(default_factory=list)  # every structure priced, trained or not
    cheapest_latency_s: float = 0.0

    def manifest(self, budget: Budget, model: LatencyModel) -> dict[str, Any]:
        return {
            "latency_budget_s": budget.latency_s,
            "bytes_budget": budget.bytes_online,
            "protocol": model.protocol,
            "network": model.network,
            "cheapest_predicted_latency_s": self.cheapest_latency_s,
            "chosen": self.chosen.describe(),
            "candidates": [asdict(c) | {"chosen": c is self.chosen, "trained": c.val_accuracy is not None or c.error is not None} for c in self.candidates],
        }


def max_pools(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the max-pool modules in forward order."""
    return [n for n in forward_order(model, example) if isinstance(model.get_submodule(n), nn.MaxPool2d)]


def pool_choices(pools: list[str]) -> list[tuple[str, ...]]:
    """Which max-pools to convert: every subset of a few, else the last k for each k."""
    if len(pools) <= EXHAUSTIVE_POOLS:
        return [c for k in range(len(pools) + 1) for c in itertools.combinations(pools, k)]
    return [tuple(pools[len(pools) - k :]) for k in range(len(pools) + 1)]


def with_average_pools(model: nn.Module, pools: tuple[str, ...]) -> nn.Module:
    """A copy of `model` whose named max-pools are average pools of the same window."""
    out = copy.deepcopy(model)
    for name in pools:
        set_module(out, name, avg_pool_like(out.get_submodule(name)))
    return out


def pruned_structure(graph: Graph, sparsity: float) -> Graph:
    """The graph block pruning at `sparsity` leaves (the blocks BlockPruner keeps per layer)."""
    if not sparsity:
        return graph
    kept = {n.name: blocks_to_keep(int(graph.weight_shapes[n.weights[0]][0]), sparsity) for n in prunable_layers(graph)}
    return pruned_graph(graph, kept)


def relu_sites(graph: Graph) -> dict[str, int]:
    """Each Relu node (in graph order: the forward order of the ReLU modules) and its elements per sample."""
    return {n.name: int(np.prod(n.attrs["out_shape"])) for n in graph.nodes if n.op == "Relu"}


def site_choices(sizes: list[int]) -> list[tuple[int, ...]]:
    """Which sites may be all-polynomial: every subset of a few, else the largest k for each k."""
    if len(sizes) <= EXHAUSTIVE_SITES:
        return [c for k in range(len(sizes) + 1) for c in itertools.combinations(range(len(sizes)), k)]
    largest = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    return [tuple(sorted(largest[:k])) for k in range(len(sizes) + 1)]


def identity_choices(sizes: list[int]) -> list[tuple[int, ...]]:
    """Which sites may be dropped together: every subset of a few but all of them (a model without a
    non-linearity is one linear map), else up to DROPPED_SITES at a time."""
    n = len(sizes)
    largest = n - 1 if n <= EXHAUSTIVE_SITES else min(DROPPED_SITES, n - 1)
    return [c for k in range(1, largest + 1) for c in itertools.combinations(range(n), k)]


def site_damage(model: nn.Module, samples: np.ndarray) -> list[float]:
    """Per ReLU site (forward order), what dropping it changes on `samples`: the share of its input's
    energy that the ReLU removes, sum(min(x, 0)^2) / sum(x^2) (0: it passes everything already)."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    out: list[float] = []

    def hook(_m, inputs, _o):
        x = inputs[0].double()
        out.append(float(x.clamp(max=0).square().sum() / x.square().sum().clamp(min=1e-30)))

    run_hooked(model.eval(), torch.as_tensor(samples, dtype=torch.float32), relus, hook)
    return out


def without_sites(graph: Graph, names: set[str]) -> Graph:
    """`graph` without the named activation nodes: each consumer reads the node's input instead."""
    renamed: dict[str, str] = {}
    nodes = []
    for node in graph.nodes:
        inputs = [renamed.get(i, i) for i in node.inputs]
        if node.name in names:
            renamed[node.output] = inputs[0]
            continue
        nodes.append(replace(node, inputs=tuple(inputs)))
    output = renamed.get(graph.output_name, graph.output_name)
    return replace(graph, output_name=output, nodes=nodes, weight_shapes=dict(graph.weight_shapes))


def with_relus_kept(graph: Graph, kept: int, polynomial: tuple[int, ...] = (), identity: tuple[int, ...] = ()) -> Graph:
    """`graph` with `kept` ReLUs spread in proportion over its sites but the `polynomial` ones
    (indices, graph order), which keep none, and the `identity` ones, which are dropped; with
    0 < kept < all, every other site keeps at least one and replaces at least one (the most
    rounds any mask can cost)."""
    sites = relu_sites(graph)
    dropped = {name for i, name in enumerate(sites) if i in identity}
    live = {name: e for i, (name, e) in enumerate(sites.items()) if i not in polynomial and name not in dropped}
    total = sum(live.values())
    masks = {}
    for name, elements in sites.items():
        if name in dropped:
            continue
        k = round(kept * elements / total) if total and name in live else 0
        if 0 < kept < total and name in live:
            k = min(max(k, 1), elements - 1) if elements > 1 else 1
        node = next(n for n in graph.nodes if n.name == name)
        mask = np.zeros(int(np.prod(node.attrs["out_shape"])), dtype=bool)
        mask[: min(k, elements)] = True
        masks[name] = ActivationSite(mask=mask.reshape(node.attrs["out_shape"]), coeffs=np.zeros((1, 3), np.float32))
    return without_sites(apply_sites(graph, masks), dropped)


def _price(graph: Graph, latency: LatencyModel) -> tuple[float, int]:
    """(predicted seconds, online bytes) of one inference of one sample."""
    costs = graph_cost(graph, 1, latency.protocol)
    return latency.seconds(costs), total_cost(costs).bytes_online


def most_relus(
    graph: Graph, latency: LatencyModel, budget: Budget, polynomial: tuple[int, ...] = (), identity: tuple[int, ...] = ()
) -> int | None:
    """The most ReLUs `graph` may keep within `budget`, none at the `polynomial` sites, the `identity`
    sites dropped (None: not even with none)."""
    total = sum(e for i, e in enumerate(relu_sites(graph).values()) if i not in polynomial and i not in identity)
    if budget.fits(*_price(with_relus_kept(graph, total, polynomial, identity), latency)):
        return total
    if not budget.fits(*_price(with_relus_kept(graph, 0, identity=identity), latency)):
        return None
    lo, hi = 0, total - 1  # lo fits; find the largest that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budget.fits(*_price(with_relus_kept(graph, mid, polynomial, identity), latency)):
            lo = mid
        else:
            hi = mid - 1
    return lo


Plan = tuple[int, tuple[int, ...], tuple[int, ...]]  # (ReLU budget, all-polynomial sites, dropped sites)


def _most_kept(
    graph: Graph, latency: LatencyModel, budget: Budget, choices: list[tuple[int, ...]], dropped: bool, damage: list[float] | None = None
) -> Plan | None:
    """Of `choices` (sites made polynomial, or dropped), the one that lets AutoReP keep the most ReLUs
    (ties: fewer sites, then, dropped, the least `damage`: sites of one size cost the same)."""
    best: tuple[int, int, float, tuple[int, ...]] | None = None
    for sites in choices:
        kept = most_relus(graph, latency, budget, () if dropped else sites, sites if dropped else ())
        key = (kept, -len(sites), -sum(damage[i] for i in sites) if dropped and damage else 0.0, sites)
        if kept is not None and (best is None or key[:3] > best[:3]):
            best = key
    if best is None:
        return None
    return (best[0], (), best[3]) if dropped else (best[0], best[3], ())


def _site_plans(graph: Graph, latency: LatencyModel, budget: Budget, linearize: bool = False, damage: list[float] | None = None) -> list[Plan]:
    """Plans to train for one structure: every site live; the set of all-polynomial sites that lets
    AutoReP keep the most ReLUs when that is another; with `linearize`, the set of dropped sites that
    does, when it keeps more still. Which is more accurate is for training to say: a whole site
    without ReLUs saves rounds, not accuracy."""
    sizes = list(relu_sites(graph).values())
    if damage is not None and len(damage) != len(sizes):  # not one per site (a model already masked): no ranking
        damage = None
    live = most_relus(graph, latency, budget)
    best = _most_kept(graph, latency, budget, site_choices(sizes), dropped=False)
    # No ReLU at all: every site a polynomial, which AutoReP then need not search for.
    plans: list[Plan] = [(live, () if live else tuple(range(len(sizes))), ())] if live is not None else []
    if best is not None and best[0] > (live or 0):
        plans.append(best)
    dropped = _most_kept(graph, latency, budget, identity_choices(sizes), dropped=True, damage=damage) if linearize else None
    if dropped is not None and (not plans or dropped[0] > max(p[0] for p in plans)):
        plans.append(dropped)
    return plans


def plan(
    model: nn.Module, example: torch.Tensor, latency: LatencyModel, budget: Budget, sparsities: tuple[float, ...] = (0.0,),
    linearize: bool = False, damage: list[float] | None = None,
) -> tuple[list[Candidate], float]:
    """Every structure priced; (the ones that fit, each with its ReLU budget; the cheapest latency of any).
    `damage`: site_damage per ReLU site, which of equally priced sites to drop."""
    feasible: list[Candidate] = []
    cheapest = math.inf
    cheapest_what = ""
    fewest_bytes = math.inf
    for pools in pool_choices(max_pools(model, example)):
        base = model_graph(with_average_pools(model, pools), example[:1])
        for sparsity in sparsities:
            graph = pruned_structure(base, sparsity)
            total = sum(relu_sites(graph).values())
            floors = [((), "every ReLU a polynomial")]
            if linearize:
                floors += [(c, f"ReLU sites {list(c)} dropped, the others polynomials") for c in identity_choices(list(relu_sites(graph).values()))]
            for dropped, what in floors:
                floor_s, floor_b = _price(with_relus_kept(graph, 0, identity=dropped), latency)
                fewest_bytes = min(fewest_bytes, floor_b)
                if floor_s < cheapest:
                    cheapest = floor_s
                    cheapest_what = f"{len(pools)} of the max-pools as average pools, {what}" + (
                        f", {sparsity:.0%} of blocks pruned" if sparsity else ""
                    )
            for kept, poly, dropped in _site_plans(graph, latency, budget, linearize, damage):
                est_s, est_b = _price(with_relus_kept(graph, kept, poly, dropped), latency)
                feasible.append(Candidate(pools, sparsity, poly, kept, total, est_s, est_b, identity_sites=dropped))
    if not feasible:
        limit = f"latency budget of {budget.latency_s:g} s" if budget.latency_s is not None else ""
        if budget.bytes_online is not None:
            limit += (" and " if limit else "") + f"bytes budget of {budget.bytes_online:,} B"
        raise LatencyBudgetError(
            f"the {limit} cannot be met on {latency.protocol} under {latency.network}: the cheapest predicted latency is "
            f"{cheapest:.4f} s ({cheapest_what})"
            + (f", the fewest online bytes {fewest_bytes:,} B" if budget.bytes_online is not None else "")
            + ("; allow --prune-blocks" if sparsities == (0.0,) else "")
        )
    return feasible, cheapest


def pruning_levels(target: float | None, epochs: float) -> tuple[tuple[float, ...], PruneConfig | None]:
    """The block-pruning sparsities the search prices for `--prune-blocks target` (none, half of it, all
    of it) and the pruning schedule: its stages scale with the epochs, as AutoReP's do (minutes on two
    cores, not MOFHEI's hours)."""
    if target is None:
        return (0.0,), None
    rounds = max(1, round(epochs))
    return tuple(sorted({0.0, target / 2, target})), PruneConfig(search=FitConfig(epochs=rounds, patience=2), settle=FitConfig(epochs=rounds, patience=2))


def range_refusal(
    model: nn.Module, example: torch.Tensor, calibration: np.ndarray, protocol: str, margin: float = 4.0,
    fraction_bits: int | str = AUTO,
) -> str | None:
    """Why the server would refuse `model`'s artifact (calibrated on `calibration`), or None.

    The server's own check (parties' check_model_range) on the same protocols pieces: the
    artifact's calibration ranges times `margin`, against the backend's fixed point.
    """
    with tempfile.TemporaryDirectory(prefix="twinfer-budget-") as tmp:
        export_artifact(model, example[:1], tmp, {}, calibration=calibration, margin=margin)
        graph = artifact_graph(tmp)
        _, weights = graph_from_onnx(onnx.load(f"{tmp}/model.onnx"))
    report = encoding_report(graph, weights, calibration_ranges(graph), fraction_bits, protocol)
    return report.message() if report.refused else None


def spread(candidates: list[Candidate], n: int) -> list[Candidate]:
    """`n` candidates evenly spaced by the share of ReLUs they keep (both ends included)."""
    ordered = sorted(candidates, key=lambda c: (c.kept_fraction, -len(c.pools), -c.sparsity))
    if len(ordered) <= n:
        return ordered
    picks = sorted({round(i * (len(ordered) - 1) / max(n - 1, 1)) for i in range(n)})
    return [ordered[i] for i in picks]


def search(
    model: nn.Module,
    fit: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    latency: LatencyModel,
    budget: Budget,
    *,
    autorep: AutoRepConfig,
    sparsities: tuple[float, ...] = (0.0,),
    pruning: PruneConfig | None = None,
    max_candidates: int = 4,
    progress: bool = False,
    calibration: np.ndarray | None = None,
    margin: float = 4.0,
    linearize: bool = False,
) -> SearchResult:
    """Train the structures that fit and return the most accurate on `val` whose exact predicted cost fits.

    With `calibration` samples (the artifact's), a candidate whose artifact the server's
    numeric-range check would refuse is passed over, with the reason recorded.
    """
    if max_candidates < 1:
        raise ValueError(f"--max-candidates must be at least 1, got {max_candidates}")
    example = torch.as_tensor(fit[0][:2], dtype=torch.float32)
    damage = site_damage(model, fit[0][:DAMAGE_SAMPLES]) if linearize else None
    feasible, cheapest = plan(model, example, latency, budget, sparsities, linearize, damage)
    teacher = model.eval()
    best: tuple[float, Candidate, nn.Module] | None = None
    for cand in spread(feasible, max_candidates):
        _log.info("training %s (predicted at most %.4f s)", cand.describe(), cand.estimate_latency_s)
        structure = with_average_pools(teacher, cand.pools)
        if cand.sparsity:
            structure = optimize_mofhei(
                structure, Split.of(*fit, seed=autorep.seed), convert=None, prune_blocks=cand.sparsity, pruning=pruning
            ).model
        config = replace(autorep, relu_budget=min(cand.relu_budget, cand.relu_total))
        relus = [n for n in forward_order(structure, example) if isinstance(structure.get_submodule(n), nn.ReLU)]
        for i in cand.identity_sites:
            set_module(structure, relus[i], nn.Identity())
        try:
            result = optimize_relus(
                structure, fit, val, config, progress=progress, distill_from=teacher,
                polynomial_sites=tuple(relus[i] for i in cand.polynomial_sites),
            )  # fmt: skip
        except BudgetError as err:  # recorded: this candidate's mask search missed its ReLU budget
            cand.error = str(err)
            continue
        graph = model_graph(result.model, example[:1])
        cand.latency_s, cand.bytes_online = _price(graph, latency)
        cand.val_accuracy, cand.relu_count = result.val_accuracy, result.relu_count
        if not budget.fits(cand.latency_s, cand.bytes_online):  # pragma: no cover - the estimate is an upper bound
            cand.error = f"predicted {cand.latency_s:.4f} s after training, over the budget"
            continue
        refused = None if calibration is None else range_refusal(result.model, example, calibration, latency.protocol, margin)
        if refused is not None:
            cand.error = f"refused by the server's numeric-range check: {refused}"
            continue
        if best is None or (cand.val_accuracy, -cand.latency_s) > (best[0], -best[1].latency_s):
            best = (cand.val_accuracy, cand, result.model)
    if best is None:
        errors = "; ".join(f"{c.describe()}: {c.error}" for c in feasible if c.error)
        raise BudgetError(f"no trained candidate can be used ({errors}); raise --epochs or --penalty, or give a larger budget")
    return SearchResult(model=best[2], chosen=best[1], candidates=feasible, cheapest_latency_s=cheapest)
