"""DP embedding training: dense DP-SGD vs DP-FEST vs DP-AdaFEST, and the private lookup's bytes.

1. MovieLens-100k (real), epsilon 1, 3 and 8, delta 1/N: test AUC, mean non-zero embedding-
   gradient rows per step, median step time, peak memory of the training process.
2. GENERATED Zipf click-log with a 1e6-row table, epsilon 3: gradient size and step time of
   FEST and AdaFEST against dense DP-SGD.
3. The DP-trained MovieLens models, and untrained tables of swept sizes, served under 2PC
   (three local processes): online bytes of the private embedding lookup against the deployed
   table's rows, beside the cost model.
Each training run is its own process, so its peak RSS is its own. Every number is measured in
this run; ratios are against the dense run of the same invocation. Prints tables, then JSON.

    python benchmarks/dp_embeddings.py [--epsilons 1 3 8] [--zipf-vocab 1000000] [--lookup-rows 1000 4000 16000] [--out results/dp_embeddings.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("dense", "fest", "adafest")
# Hyperparameters, the same for the three methods except where a method has its own knob.
MOVIELENS = {}  # DPTrainConfig defaults; with --tune the learning rates below are chosen per run
# Learning rates tried for each (epsilon, method) on a validation split carved out of the
# training examples; the test examples are never seen until the chosen configuration's run.
TUNE_GRID = {"lr_embedding": [10.0, 20.0, 40.0, 80.0], "lr_mlp": [3e-3, 1e-2, 3e-2]}
VALIDATION_FRACTION = 0.1
ZIPF = {"epochs": 1.0, "batch_size": 1024, "threshold_sigmas": 4.0, "fest_topk": 500, "lr_embedding": 40.0}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run (in its own process): summary plus peak memory."""
    import torch

    torch.set_num_threads(1)
    from twinfer.optimizer.data.dp_data import load_dataset
    from twinfer.optimizer.dp.sparse_training import DPTrainConfig, train_dp, write_dp_artifact

    data = load_dataset(spec["dataset"], zipf_vocab=spec.get("zipf_vocab", 1_000_000))
    config = DPTrainConfig(**spec["config"])
    rss_before = _rss_mb()
    result = train_dp(data, config)
    out = result.summary() | {
        "dataset": data.name,
        "generated": data.generated,
        "peak_rss_mb": _rss_mb(),
        "peak_rss_before_training_mb": rss_before,
        "rows": result.rows_kept_per_field(),
        "config": dataclasses.asdict(config),
    }
    if spec.get("artifact"):
        write_dp_artifact(spec["artifact"], result, data)
        out["artifact"] = spec["artifact"]
    return out


def tune_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Grid over the learning rates on a validation split of the training examples; best by AUC."""
    import itertools

    import torch

    torch.set_num_threads(1)
    from twinfer.optimizer.data.dp_data import load_dataset
    from twinfer.optimizer.dp.sparse_training import DPTrainConfig, train_dp

    data = load_dataset(spec["dataset"]).validation_split(VALIDATION_FRACTION)
    tried = []
    for values in itertools.product(*TUNE_GRID.values()):
        knobs = dict(zip(TUNE_GRID, values))
        result = train_dp(data, DPTrainConfig(**(spec["config"] | knobs)))
        tried.append(knobs | {"validation_auc": result.test_auc})
    best = max(tried, key=lambda t: t["validation_auc"])
    return {"chosen": {k: best[k] for k in TUNE_GRID}, "validation_auc": best["validation_auc"], "tried": tried}


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=1800
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training run {spec} failed: {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def lookup_bytes(model: bytes, queries: np.ndarray, batch: int) -> dict[str, Any]:
    """Serve a model privately (dealer, server, client processes) and read the lookup's counters."""
    from twinfer.deploy.launch.local import run_local_session
    from twinfer.parties.runtime.model_file import parse_model
    from twinfer.protocols.ops.embedding import LookupCost

    graph, _ = parse_model(model)
    node = graph.nodes[0]
    reports = run_local_session(model, queries, batch)
    client = reports["client"]
    batches = len(client.batch_latency_s)
    layer = client.layers[node.name]
    predicted = LookupCost.predict(batch, graph.input_shape[0], node.attrs["rows"], node.attrs["dim"])
    return {
        "rows": node.attrs["rows"],
        "fields": graph.input_shape[0],
        "batch": batch,
        "lookup_bytes_online_per_batch": (layer["bytes_sent"] + layer["bytes_received"]) / batches,
        "lookup_rounds_per_batch": layer["rounds"] / batches,
        "predicted_lookup_bytes_online_per_batch": predicted.bytes_online,
        "session_bytes_online_per_batch": float(np.mean(client.batch_bytes_online)),
        "latency_per_batch_s": float(np.median(client.batch_latency_s)),
        "lookup_wall_s_per_batch": layer["wall_s"] / batches,
    }


def random_lookup_model(rows: int, fields: int = 2, seed: int = 0) -> bytes:
    """An untrained EmbeddingMLP whose deployed table has `rows` rows (for the vocabulary sweep)."""
    import torch

    from twinfer.optimizer.dp.embedding_model import EmbeddingMLP, deploy_rows, export_onnx

    per_field = [(rows - 1) // fields + (1 if f < (rows - 1) % fields else 0) for f in range(fields)]
    model = EmbeddingMLP(per_field, seed=seed)
    with torch.no_grad():
        model.table.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return export_onnx(model, deploy_rows(model, torch.ones(rows - 1, dtype=torch.bool)))


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--zipf-vocab", type=int, default=1_000_000)
    parser.add_argument("--zipf-epsilon", type=float, default=3.0)
    parser.add_argument("--queries", type=int, default=16, help="MovieLens test examples served privately per model")
    parser.add_argument("--lookup-rows", type=int, nargs="*", default=[1000, 4000, 16000], help="table sizes for the lookup sweep")
    parser.add_argument("--out", default="results/dp_embeddings.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"choose the MovieLens learning rates per run on a {VALIDATION_FRACTION:g} validation split of the training data",
    )
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(tune_worker(spec) if spec.get("tune") else worker(spec)))
        return 0

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="dp-emb-"))
    movielens: list[dict[str, Any]] = []
    for eps in args.epsilons:
        for method in METHODS:
            config = MOVIELENS | {"method": method, "epsilon": eps}
            tuning = None
            if args.tune:
                tuning = _run_worker({"dataset": "movielens-100k", "config": config, "tune": True})
                config = config | tuning["chosen"]
            spec = {"dataset": "movielens-100k", "config": config}
            if eps == 3.0:
                spec["artifact"] = str(tmp / f"ml-{method}")
            movielens.append(_run_worker(spec) | {"epsilon_target": eps, "tuning": tuning})
            chosen = f" (chosen on validation: {tuning['chosen']}, val auc {tuning['validation_auc']:.4f})" if tuning else ""
            print(f"movielens eps={eps:g} {method}: test auc {movielens[-1]['test_auc']:.4f}{chosen}", file=sys.stderr, flush=True)
    zipf = []
    for method in METHODS:
        spec = {"dataset": "generated-zipf", "zipf_vocab": args.zipf_vocab, "config": ZIPF | {"method": method, "epsilon": args.zipf_epsilon}}
        zipf.append(_run_worker(spec))
        print(f"generated-zipf {method}: step {zipf[-1]['step_s_median'] * 1e3:.1f} ms", file=sys.stderr, flush=True)

    from twinfer.optimizer.data.dp_data import load_dataset
    from twinfer.optimizer.dp.sparse_training import encode_for_artifact

    from twinfer.parties.runtime.model_file import read_model_bytes

    test_ids = load_dataset("movielens-100k").test_ids[: args.queries]
    serving = []
    for row in movielens:
        if "artifact" not in row:
            continue
        queries = encode_for_artifact(row["artifact"], test_ids).astype(np.float32)
        serving.append({"model": f"MovieLens eps 3, {row['method']}"} | lookup_bytes(read_model_bytes(row["artifact"]), queries, args.queries))
    rng = np.random.default_rng(0)
    for rows in args.lookup_rows:  # untrained two-field models: bytes against the table's rows
        queries = rng.integers(0, rows, size=(args.queries, 2)).astype(np.float32)
        serving.append({"model": f"random 2-field table, {rows} rows"} | lookup_bytes(random_lookup_model(rows), queries, args.queries))

    # Ratios against the dense run of this invocation.
    for group in [movielens[i : i + len(METHODS)] for i in range(0, len(movielens), len(METHODS))] + [zipf]:
        dense = next(r for r in group if r["method"] == "dense")
        for r in group:
            r["auc_minus_dense"] = r["test_auc"] - dense["test_auc"]
            r["gradient_size_reduction_vs_dense"] = dense["mean_gradient_rows"] / max(r["mean_gradient_rows"], 1e-9)
            r["step_speedup_vs_dense"] = dense["step_s_median"] / max(r["step_s_median"], 1e-12)

    _table(
        "MovieLens-100k (real data): DP training, delta = 1/N",
        ["eps", "method", "eps RDP / PLD", "sigma eff (grad / sel)", "lr emb / mlp (val AUC)", "test AUC", "AUC - dense", "grad rows/step", "rows ever", "step ms", "speedup", "peak RSS MB"],
        [
            [
                f"{r['epsilon_target']:g}",
                r["method"],
                f"{r['privacy']['epsilon_rdp']:.3f} / {r['privacy']['epsilon_pld']:.3f}",
                f"{r['privacy']['noise_multiplier_effective']:.3f} ({r['privacy']['noise_multiplier_gradient']:.3f} / "
                + (f"{r['privacy']['noise_multiplier_selection']:.3f})" if r["privacy"]["noise_multiplier_selection"] else "-)"),
                f"{r['config']['lr_embedding']:g} / {r['config']['lr_mlp']:g}"
                + (f" ({r['tuning']['validation_auc']:.4f})" if r["tuning"] else " (defaults)"),
                f"{r['test_auc']:.4f}",
                f"{r['auc_minus_dense']:+.4f}",
                f"{r['mean_gradient_rows']:.0f} / {r['vocab_total']}",
                f"{r['rows_ever_updated']}",
                f"{r['step_s_median'] * 1e3:.1f}",
                f"{r['step_speedup_vs_dense']:.2f}x",
                f"{r['peak_rss_mb']:.0f}",
            ]
            for r in movielens
        ],
    )
    _table(
        f"GENERATED Zipf click-log (synthetic), {args.zipf_vocab} id rows, eps {args.zipf_epsilon:g}",
        ["method", "test AUC (generated)", "grad rows/step", "grad floats/step", "size reduction vs dense", "step ms", "speedup vs dense", "peak RSS MB"],
        [
            [
                r["method"],
                f"{r['test_auc']:.4f}",
                f"{r['mean_gradient_rows']:.1f} / {r['vocab_total']}",
                f"{r['gradient_floats_per_step']:.0f}",
                f"{r['gradient_size_reduction_vs_dense']:.0f}x",
                f"{r['step_s_median'] * 1e3:.2f}",
                f"{r['step_speedup_vs_dense']:.1f}x",
                f"{r['peak_rss_mb']:.0f}",
            ]
            for r in zipf
        ],
    )
    _table(
        f"Private embedding lookup under 2PC (batch {args.queries}, one-hot x table, measured vs cost model)",
        ["model", "fields", "deployed rows", "lookup bytes_online / batch", "predicted (cost model)", "lookup rounds", "session bytes / batch", "latency / batch"],
        [
            [
                s["model"],
                f"{s['fields']}",
                f"{s['rows']}",
                f"{s['lookup_bytes_online_per_batch']:.0f}",
                f"{s['predicted_lookup_bytes_online_per_batch']:.0f}",
                f"{s['lookup_rounds_per_batch']:.0f}",
                f"{s['session_bytes_online_per_batch']:.0f}",
                f"{s['latency_per_batch_s']:.3f} s",
            ]
            for s in serving
        ],
    )
    eps3 = [r for r in movielens if r["epsilon_target"] == 3.0]
    targets = {
        "auc_within_0.01_of_dense_at_eps3": {r["method"]: abs(r["auc_minus_dense"]) <= 0.01 or r["auc_minus_dense"] > 0 for r in eps3},
        "zipf_gradient_size_reduction_at_least_1000x": {r["method"]: r["gradient_size_reduction_vs_dense"] >= 1000 for r in zipf if r["method"] != "dense"},
        "zipf_step_speedup_at_least_10x": {r["method"]: r["step_speedup_vs_dense"] >= 10 for r in zipf if r["method"] != "dense"},
    }
    print("targets met (measured above):", json.dumps(targets))
    report = {
        "movielens": movielens,
        "generated_zipf": {"generated": True, "vocab": args.zipf_vocab, "runs": zipf},
        "private_lookup": serving,
        "targets": targets,
        "wall_s": time.perf_counter() - start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
