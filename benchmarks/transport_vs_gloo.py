"""twinfer over gRPC against stock CrypTen over torch.distributed/gloo, same model, same provider.

Both runs evaluate the same compiled graph with the same secure layers and the same tuple
math (CrypTen's trusted third party: TTPServer over gloo, twinfer's dealer over gRPC), with
three processes and one intra-op thread each. Rounds and bytes are CrypTen's own counters on
the client (rank 1), which both communicators share; latency is the client's wall time per
batch, median over repetitions. A third column runs twinfer with its dealer prefetching each
batch's tuples (the offline phase), which CrypTen's TTP cannot do; its first batch per
session, which records the tuple plan, is left out of that median.

    python benchmarks/transport_vs_gloo.py [--batches 1 32] [--reps 5] [--json-out results/transport_vs_gloo.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch


def _model_bytes() -> tuple[bytes, np.ndarray]:
    from twinfer.deploy.config.paths import cache_dir
    from twinfer.deploy.launch.inference import model_bytes
    from twinfer.optimizer.data.datasets import load_fashion_mnist
    from twinfer.optimizer.zoo.demo_models import load_or_train_demo_model

    model = load_or_train_demo_model("fashion_cnn", cache_dir() / "models", progress=False)
    images, _ = load_fashion_mnist("test")
    return model_bytes(model, (1, 28, 28)), images


# -- stock CrypTen over gloo ------------------------------------------------------------------


def _gloo_worker(rank: int, rendezvous: str, onnx_bytes: bytes, x: np.ndarray, reps: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", RENDEZVOUS=rendezvous, DISTRIBUTED_BACKEND="gloo")
    from twinfer.protocols.backends.crypten.patches import load_crypten
    from twinfer.parties.runtime.model_file import parse_model
    from twinfer.protocols.backends.crypten.backend import CryptenBackend
    from twinfer.protocols.secure_graph import run_secure

    crypten = load_crypten()
    crypten.cfg.mpc.provider = "TTP"
    crypten.cfg.communicator.verbose = True
    if rank == 2:
        from crypten.mpc.provider.ttp_provider import TTPServer

        TTPServer()  # serves tuples until rank 0 says terminate
        return
    crypten.init()
    backend = CryptenBackend.attach(rank)
    graph, weights = parse_model(onnx_bytes)
    shared = {
        k: crypten.cryptensor(torch.from_numpy(weights[k]) if rank == 0 else torch.zeros(graph.weight_shapes[k]), src=0)
        for k in sorted(graph.weight_shapes)
    }
    import crypten.communicator as comm

    results = []
    for _ in range(reps):
        comm.get().reset_communication_stats()
        start = time.perf_counter()
        xs = crypten.cryptensor(torch.from_numpy(x) if rank == 1 else torch.zeros(x.shape), src=1)
        logits = run_secure(graph, shared, xs, backend).get_plain_text(dst=1)
        elapsed = time.perf_counter() - start
        results.append((elapsed, dict(comm.get().get_communication_stats())))
    if rank == 1:
        out.put({"latency": [r[0] for r in results], "stats": results[-1][1], "logits": logits.numpy()})
    crypten.uninit()


def run_gloo(onnx_bytes: bytes, x: np.ndarray, reps: int) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    rendezvous = f"file://{tempfile.gettempdir()}/twinfer-gloo-{uuid.uuid4().hex}"
    procs = [ctx.Process(target=_gloo_worker, args=(r, rendezvous, onnx_bytes, x, reps, out)) for r in (0, 1, 2)]
    for p in procs:
        p.start()
    result = out.get(timeout=900)
    for p in procs:
        p.join(timeout=60)
    return result


# -- twinfer over gRPC ---------------------------------------------------------------------------


def run_twinfer(onnx_bytes: bytes, x: np.ndarray, reps: int, prefetch: bool = False) -> dict:
    from twinfer.deploy.launch.local import run_local_session
    from twinfer.parties.runtime.session_spec import SessionSpec

    report = run_local_session(onnx_bytes, np.concatenate([x] * reps), len(x), spec=SessionSpec(prefetch=prefetch))["client"]
    return {"latency": report.batch_latency_s, "stats": report.batch_protocol_stats[-1], "logits": report.logits[: len(x)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--reps", type=int, default=5, help="batches per run; the median latency is reported")
    parser.add_argument("--runs", type=int, default=2, help="runs of each backend, alternated to spread machine noise")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)

    onnx_bytes, images = _model_bytes()
    rows = []
    for batch in args.batches:
        x = np.ascontiguousarray(images[:batch])
        gloo_runs, grpc_runs, pre_runs = [], [], []
        for _ in range(args.runs):  # alternate, so drift in machine load hits all alike
            gloo_runs.append(run_gloo(onnx_bytes, x, args.reps))
            grpc_runs.append(run_twinfer(onnx_bytes, x, args.reps, prefetch=False))
            pre_runs.append(run_twinfer(onnx_bytes, x, args.reps, prefetch=True))
        gloo, grpc, pre = gloo_runs[-1], grpc_runs[-1], pre_runs[-1]
        gloo["latency"] = [t for r in gloo_runs for t in r["latency"]]
        grpc["latency"] = [t for r in grpc_runs for t in r["latency"]]
        # With prefetch the first batch of a session records the tuple plan: steady state is the rest.
        pre["latency"] = [t for r in pre_runs for t in r["latency"][1:]]
        row = {
            "model": "fashion_cnn",
            "batch": batch,
            "reps": args.reps,
            "runs": args.runs,
            "gloo_latency_s": statistics.median(gloo["latency"]),
            "twinfer_latency_s": statistics.median(grpc["latency"]),
            "gloo_rounds": int(gloo["stats"]["rounds"]),
            "twinfer_rounds": int(grpc["stats"]["rounds"]),
            "gloo_bytes": int(gloo["stats"]["bytes"]),
            "twinfer_bytes": int(grpc["stats"]["bytes"]),
            "max_logit_diff": float(np.abs(gloo["logits"] - grpc["logits"]).max()),
            "gloo_latencies_s": [round(t, 4) for t in gloo["latency"]],
            "twinfer_latencies_s": [round(t, 4) for t in grpc["latency"]],
            "twinfer_prefetch_latency_s": statistics.median(pre["latency"]),
            "twinfer_prefetch_latencies_s": [round(t, 4) for t in pre["latency"]],
            "twinfer_prefetch_rounds": int(pre["stats"]["rounds"]),
        }
        row["latency_ratio_twinfer_over_gloo"] = row["twinfer_latency_s"] / row["gloo_latency_s"]
        row["latency_ratio_prefetch_over_gloo"] = row["twinfer_prefetch_latency_s"] / row["gloo_latency_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    print()
    print("median latency per batch; 'twinfer' runs the same on-demand TTP protocol as gloo,")
    print("'+prefetch' has the dealer make each batch's tuples ahead of use (first batch excluded)")
    header = (
        f"{'batch':>5} {'rounds g/t':>11} {'MB g/t (client)':>17} {'gloo s':>8} {'twinfer s':>10} "
        f"{'ratio':>6} {'+prefetch s':>12} {'ratio':>6}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['batch']:>5} {r['gloo_rounds']:>5}/{r['twinfer_rounds']:<5} "
            f"{r['gloo_bytes'] / 1e6:>8.1f}/{r['twinfer_bytes'] / 1e6:<8.1f} "
            f"{r['gloo_latency_s']:>8.3f} {r['twinfer_latency_s']:>10.3f} {r['latency_ratio_twinfer_over_gloo']:>6.2f} "
            f"{r['twinfer_prefetch_latency_s']:>12.3f} {r['latency_ratio_prefetch_over_gloo']:>6.2f}"
        )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
