"""Soak test of a standing server: many sessions against one `twinfer serve`, with 1 and 2 workers.

One `twinfer dealer` and, for each worker count, one `twinfer serve` run as real processes on
loopback; the clients (`twinfer.Client`) run in a pool of --wave client processes, so that
concurrent sessions do not share one interpreter's lock.
Half the sessions run one after another, the other half in waves of --wave at once. Each result
is compared with plaintext PyTorch (a mismatch over 0.01 counts as a failure). Measured here:
sessions and inferences per second (waves; the ratio of 2 workers to 1), p50/p95 session
latency (Open to logits, as the client sees it), the server's resident memory (main process and
workers) after 10 sessions and after all of them, failures, and what is left once the server
stopped on SIGTERM (its processes, this process's threads). The clients share the machine's
cores with the server: on 2 cores, more workers cannot mean proportionally more throughput.

    python benchmarks/serve_soak.py [--sessions 200] [--workers 1 2] [--wave 4] [--samples 2]
        [--tls] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

RSS_EARLY = 10  # sessions after which the first memory reading is taken


def _model(workdir: Path) -> tuple[Path, torch.nn.Module]:
    from twinfer.deploy.config.paths import cache_dir
    from twinfer.optimizer.zoo.demo_models import load_or_train_demo_model
    from twinfer.protocols.passes.onnx_export import export_onnx

    model = load_or_train_demo_model("fashion_cnn", cache_dir() / "models", progress=False)
    path = workdir / "fashion_cnn.onnx"
    path.write_bytes(export_onnx(model, torch.zeros(1, 1, 28, 28)))
    return path, model


def _server_rss(pid: int) -> int:
    from twinfer.deploy.serve.processes import child_pids, rss_bytes

    return sum(rss_bytes(p) for p in [pid, *child_pids(pid)])


def _client_session(address: str, dealer: str, tls: Path | None, x: np.ndarray) -> tuple[float, np.ndarray | str]:
    """One session in a client process: its latency (Open to logits) and the logits, or the error."""
    from twinfer import Client
    from twinfer.parties.runtime.session_spec import SessionSpec
    from twinfer.parties.wire.transport import TransportOptions

    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        with Client(address, spec=SessionSpec(options=TransportOptions(recv_timeout_s=120, connect_timeout_s=30)), dealer=dealer, tls=tls) as client:
            logits = client.infer(x)
        return time.perf_counter() - start, logits
    except Exception as err:  # noqa: BLE001 - counted, the soak goes on
        return time.perf_counter() - start, str(err)


class Soak:
    """Sessions against one standing server: latencies, failures, and memory at two points."""

    def __init__(self, pool, server, address: str, dealer: str, tls: Path | None, images: np.ndarray, expected: np.ndarray, samples: int) -> None:
        self.pool, self.server, self.address, self.dealer, self.tls = pool, server, address, dealer, tls
        self.images, self.expected, self.samples = images, expected, samples
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.done = 0
        self.rss_early: int | None = None

    def _submit(self, k: int):
        begin = (k * self.samples) % (len(self.images) - self.samples)
        return k, begin, self.pool.submit(_client_session, self.address, self.dealer, self.tls, self.images[begin : begin + self.samples])

    def _record(self, k: int, begin: int, future) -> None:
        latency, logits = future.result()
        want = self.expected[begin : begin + self.samples]
        if isinstance(logits, str):
            self.failures.append(f"session {k}: {logits}")
        elif np.abs(logits - want).max() >= 0.01:
            self.failures.append(f"session {k}: logits off by {np.abs(logits - want).max():.3g}")
        self.latencies.append(latency)
        self.done += 1
        if self.done == RSS_EARLY:
            time.sleep(0.5)  # the tenth session's end reaches the server's bookkeeping
            self.rss_early = _server_rss(self.server.proc.pid)

    def sequential(self, n: int, first: int) -> float:
        start = time.perf_counter()
        for k in range(first, first + n):
            self._record(*self._submit(k))
        return time.perf_counter() - start

    def waves(self, n: int, first: int, wave: int) -> float:
        start = time.perf_counter()
        for w in range(first, first + n, wave):
            for submitted in [self._submit(k) for k in range(w, min(w + wave, first + n))]:
                self._record(*submitted)
        return time.perf_counter() - start


def run_workers(workers: int, args: argparse.Namespace, workdir: Path, model: Path, dealer: str, images, expected) -> dict:
    from twinfer.deploy.serve.processes import alive, child_pids, start_standing, thread_count

    extra = ["--tls", str(args.tls_dir)] if args.tls_dir else []
    server, address = start_standing(
        "serve", workdir, "--model", str(model), "--dealer", dealer, "--workers", str(workers),
        "--max-sessions", str(max(args.wave, 2)), "--timeout", "120", *extra,
    )  # fmt: skip
    threads_before = threading.active_count()
    pool = ProcessPoolExecutor(max_workers=args.wave, mp_context=mp.get_context("spawn"))
    try:
        soak = Soak(pool, server, address, dealer, args.tls_dir, images, expected, args.samples)
        soak.waves(args.wave, 0, args.wave)  # warm-up: client processes import torch and CrypTen, workers compile
        soak.latencies, soak.done, soak.failures = [], 0, []
        n_seq = args.sessions // 2
        seq_s = soak.sequential(n_seq, 0)
        seq_latencies = list(soak.latencies)
        wave_s = soak.waves(args.sessions - n_seq, n_seq, args.wave)
        time.sleep(0.5)
        rss_end = _server_rss(server.proc.pid)
        server_threads = thread_count(server.proc.pid)
        children = child_pids(server.proc.pid)
    finally:
        pool.shutdown(wait=True)
        os.kill(server.proc.pid, signal.SIGTERM)
        code = server.proc.wait(timeout=120)
    time.sleep(1.0)
    n_wave = args.sessions - n_seq
    return {
        "workers": workers,
        "sessions": args.sessions,
        "sequential": {"sessions": n_seq, "wall_s": seq_s, "sessions_per_s": n_seq / seq_s if n_seq else None},
        "waves": {"sessions": n_wave, "wave": args.wave, "wall_s": wave_s, "sessions_per_s": n_wave / wave_s,
                  "inferences_per_s": n_wave * args.samples / wave_s},
        "latency_p50_s": float(np.percentile(soak.latencies, 50)),
        "latency_p95_s": float(np.percentile(soak.latencies, 95)),
        "latency_p50_sequential_s": float(np.percentile(seq_latencies, 50)) if seq_latencies else None,
        "server_rss_after_10_mib": soak.rss_early / 2**20 if soak.rss_early else None,
        "server_rss_after_all_mib": rss_end / 2**20,
        "rss_growth": (rss_end / soak.rss_early - 1) if soak.rss_early else None,
        "server_threads_at_end": server_threads,
        "failures": len(soak.failures),
        "failure_examples": soak.failures[:3],
        "exit_code_after_sigterm": code,
        "leftover_processes": [p for p in children if alive(p)],
        "leftover_client_threads": threading.active_count() - threads_before,
    }  # fmt: skip


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"serve soak: fashion_cnn, {result['samples']} samples per session, {result['sessions']} sessions per worker count, "
          f"waves of {result['wave']}, TLS {'on' if result['tls'] else 'off'}")  # fmt: skip
    print(f"machine: {m['cpu_count']} CPUs, load average {m['load_avg_start']:.2f} at start, {m['load_avg_end']:.2f} at end")
    print(f"{'workers':>7} {'seq s/s':>8} {'wave s/s':>8} {'inf/s':>7} {'p50 s':>7} {'p95 s':>7} {'RSS@10':>8} {'RSS@end':>8} "
          f"{'growth':>7} {'fail':>5} {'exit':>5} {'left':>5}")  # fmt: skip
    for r in result["runs"]:
        growth = f"{100 * r['rss_growth']:+.1f}%" if r["rss_growth"] is not None else "-"
        left = len(r["leftover_processes"]) + max(0, r["leftover_client_threads"])
        print(
            f"{r['workers']:>7} {r['sequential']['sessions_per_s'] or 0:>8.2f} {r['waves']['sessions_per_s']:>8.2f} "
            f"{r['waves']['inferences_per_s']:>7.2f} {r['latency_p50_s']:>7.2f} {r['latency_p95_s']:>7.2f} "
            f"{r['server_rss_after_10_mib'] or 0:>7.0f}M {r['server_rss_after_all_mib']:>7.0f}M {growth:>7} {r['failures']:>5} "
            f"{r['exit_code_after_sigterm']:>5} {left:>5}"
        )
    if result.get("wave_throughput_ratio") is not None:
        print(f"throughput in waves, {result['runs'][-1]['workers']} workers vs {result['runs'][0]['workers']}: "
              f"{result['wave_throughput_ratio']:.2f}x")  # fmt: skip
    print("targets: RSS growth within 10%, 0 failures, exit 0 after SIGTERM, nothing left (processes + client threads)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200, help="sessions per worker count (default 200)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare (default 1 2)")
    parser.add_argument("--wave", type=int, default=4, help="sessions at once in the concurrent half (default 4)")
    parser.add_argument("--samples", type=int, default=2, help="samples each session infers (default 2)")
    parser.add_argument("--tls", action="store_true", help="mutual TLS on every link (certificates made for this run)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.sessions < RSS_EARLY + 2 or args.wave < 1 or args.samples < 1 or min(args.workers) < 1:
        parser.error(f"--sessions must be at least {RSS_EARLY + 2}; --wave, --samples and --workers at least 1")
    from twinfer.deploy.serve.processes import start_standing
    from twinfer.optimizer.data.datasets import load_fashion_mnist

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="twinfer-soak-") as tmp:
        workdir = Path(tmp)
        args.tls_dir = None
        if args.tls:
            from twinfer.deploy.config.certs import make_certs

            args.tls_dir = make_certs(workdir / "certs")
        model_path, model = _model(workdir)
        images = load_fashion_mnist("test")[0][:256]
        with torch.no_grad():
            expected = model(torch.from_numpy(images)).numpy()
        extra = ["--tls", str(args.tls_dir)] if args.tls_dir else []
        dealer, dealer_address = start_standing("dealer", workdir, "--timeout", "120", *extra)
        try:
            runs = []
            for workers in args.workers:
                print(f"  {workers} worker(s): {args.sessions} sessions ...", file=sys.stderr, flush=True)
                runs.append(run_workers(workers, args, workdir, model_path, dealer_address, images, expected))
        finally:
            os.kill(dealer.proc.pid, signal.SIGTERM)
            dealer_code = dealer.proc.wait(timeout=60)
    rates = [r["waves"]["sessions_per_s"] for r in runs]
    result = {
        "sessions": args.sessions, "wave": args.wave, "samples": args.samples, "tls": args.tls,
        "machine": {"cpu_count": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0]},
        "runs": runs,
        "wave_throughput_ratio": rates[-1] / rates[0] if len(rates) > 1 else None,
        "dealer_exit_code_after_sigterm": dealer_code,
    }  # fmt: skip
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
