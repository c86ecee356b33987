"""Secure comparisons per protocol: one ReLU layer of 1e4, 1e5 and 1e6 elements, fss and fss-compact beside crypten.

Three parts, all measured in this run:

1. End to end: a one-layer ReLU model runs privately (dealer, server and client processes over
   gRPC on loopback, batch 1, six batches: the first records the dealer requests, the
   later ones' are prefetched while the one before runs) on each backend.
   From the ReLU layer's own counters: online rounds, online bytes sent per party per ReLU,
   offline bytes from the dealer per party per ReLU (the mean of the two parties'); and the
   latency of the first batch and the mean of the five after it (share the input, the layer,
   reveal): with the dealer making keys while the parties run on the same two cores, a single
   later batch waits for whatever of its keys is not made yet, so one batch alone is noise.
2. The fss kernels on one core, for each ReLU (one round from a DCF, `relu.py`; two rounds from
   a one-bit comparison and a select, `select_relu.py`): the dealer's key generation rate (key
   pairs per second), one party's evaluation rate (ReLUs per second, given what is opened)
   and the key bytes per ReLU per party, at comparison widths n = 16, 24, 32 and 64.
3. The widths the demo models compare at (what a server's check settles, fashion_cnn and
   tiny_resnet) and what their comparisons' keys weigh per comparison under each ReLU.

Targets: fss 1 round and at most 8 bytes sent per party per ReLU; a one-round key of at most
2.1 KB per ReLU per party at n = 64 (issue 13); fss-compact keys of at most 600 B per
comparison per party at the widths the demo models need (issue 24); at n = 32 evaluation
>= 1e6 ReLU/s per party and key generation >= 2.5e5 pairs/s.

    python benchmarks/comparison_protocols.py [--sizes 10000 100000 1000000] [--out results/comparison_protocols.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _relu_model(n: int) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def end_to_end(n: int, protocol: str) -> dict:
    from twinfer.deploy.launch.local import run_local_session
    from twinfer.parties.runtime.session_spec import SessionSpec
    from twinfer.parties.wire.transport import TransportOptions

    x = np.random.default_rng(n).normal(0, 4, (6, n)).astype(np.float32)
    options = TransportOptions(recv_timeout_s=600, connect_timeout_s=120)
    reports = run_local_session(_relu_model(n), x, 1, spec=SessionSpec(options=options, protocol=protocol), timeout_s=1200)
    client, server = reports["client"], reports["server"]
    layer = client.layers["relu"]
    batches = len(client.batch_latency_s)
    np.testing.assert_allclose(client.logits, np.maximum(x, 0), atol=1e-3)  # a wrong result is no figure
    return {
        "protocol": protocol,
        "elements": n,
        "rounds": layer["rounds"] / batches,
        "bytes_sent_per_relu": layer["bytes_sent"] / batches / n,
        "bytes_online_per_relu": (layer["bytes_sent"] + layer["bytes_received"]) / batches / n,
        "bytes_offline_per_relu": (client.bytes_offline + server.bytes_offline) / 2 / batches / n,
        "first_batch_s": client.batch_latency_s[0],
        "later_batch_s": float(np.mean(client.batch_latency_s[1:])),
        "comparisons": client.comparisons // batches,
    }


def kernels(n: int, bits: int, kind: str) -> dict:
    """The fss dealer's and one party's ReLU kernels (`kind` one-round or two-round) on this process's single core."""
    from twinfer.protocols.backends.fss.prg import AesCtrPrg
    from twinfer.protocols.backends.fss.relu import masked_share, relu_eval, relu_keys
    from twinfer.protocols.backends.fss.select_relu import select_bits, select_relu_eval, select_relu_keys

    rng = AesCtrPrg()
    start = time.perf_counter()
    k0, k1 = (relu_keys if kind == "one-round" else select_relu_keys)(n, bits, rng)
    keygen_s = time.perf_counter() - start
    half = 1 << (bits - 2)
    x = np.random.default_rng(bits).integers(-half, half, n, dtype=np.int64)
    share0 = np.random.default_rng(1).integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True)
    x_hat = masked_share(k0, share0) + masked_share(k1, x - share0)
    if kind == "one-round":
        start = time.perf_counter()
        y0 = relu_eval(0, k0, x_hat)
        eval_s = time.perf_counter() - start
        y1 = relu_eval(1, k1, x_hat)
    else:
        d1 = select_bits(1, k1, x_hat)
        start = time.perf_counter()
        d_hat = select_bits(0, k0, x_hat) ^ d1  # party 0's part of the exchange is its own bits
        y0 = select_relu_eval(0, k0, x_hat, d_hat)
        eval_s = time.perf_counter() - start
        y1 = select_relu_eval(1, k1, x_hat, d_hat)
    assert np.array_equal((y0 + y1).view(np.int64), np.maximum(x, 0)), f"fss {kind} ReLU is wrong"
    return {
        "relu": kind,
        "elements": n,
        "bits": bits,
        "keygen_pairs_per_s": n / keygen_s,
        "eval_relu_per_s": n / eval_s,
        "key_bytes_per_relu": k0.nbytes / n,
    }


def model_widths(name: str) -> dict:
    """The comparison widths a server settles for demo model `name` (fss's check, its default
    settings) and the key bytes per comparison per party they cost under each ReLU."""
    import torch

    from twinfer.deploy.config.paths import cache_dir
    from twinfer.optimizer.zoo.demo_models import load_or_train_demo_model
    from twinfer.parties.runtime.model_file import parse_model
    from twinfer.parties.runtime.session import PartyConfig, server_graph
    from twinfer.parties.runtime.session_spec import SessionSpec
    from twinfer.protocols.backends.fss.relu import key_bytes_per_relu
    from twinfer.protocols.backends.fss.select_relu import key_bytes_per_select_relu
    from twinfer.protocols.cost_model import graph_cost
    from twinfer.protocols.passes.onnx_export import export_onnx

    model = load_or_train_demo_model(name, cache_dir() / "models", progress=False)
    graph, weights = parse_model(export_onnx(model, torch.zeros(1, 1, 28, 28)))
    served, _ = server_graph(graph, weights, PartyConfig(spec=SessionSpec(protocol="fss"), role="server", session_id="widths"))  # what a server serves
    bits = {node.name: int(node.attrs.get("bits", 64)) for node in served.nodes}
    compared = [(c.comparisons, bits[c.name]) for c in graph_cost(served, 1, "fss") if c.comparisons]
    total = sum(n for n, _ in compared)
    return {
        "model": name,
        "comparisons_per_image": total,
        "widths": sorted({b for _, b in compared}),
        "key_bytes_one_round": sum(n * key_bytes_per_relu(b) for n, b in compared) / total,
        "key_bytes_two_round": sum(n * key_bytes_per_select_relu(b) for n, b in compared) / total,
    }


def tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The run's tables as (title, columns, rows of cells), for the terminal and for markdown."""
    rows, kernel_rows, width_rows = result["end_to_end"], result["kernels"], result["model_widths"]
    base = {r["elements"]: r for r in rows if r["protocol"] == "crypten"}
    end_to_end = [
        [
            r["protocol"], f"{r['elements']:,}", f"{r['rounds']:g}", f"{r['bytes_sent_per_relu']:.1f}", f"{r['bytes_online_per_relu']:.1f}",
            f"{r['bytes_offline_per_relu']:.1f}", f"{r['first_batch_s']:.3f}", f"{r['later_batch_s']:.3f}",
            f"{r['later_batch_s'] / base[r['elements']]['later_batch_s']:.2f}x" if r["elements"] in base else "-",
        ]
        for r in rows
    ]  # fmt: skip
    kernels_ = [
        [r["relu"], f"{r['bits']}", f"{r['elements']:,}", f"{r['keygen_pairs_per_s']:,.0f}", f"{r['eval_relu_per_s']:,.0f}", f"{r['key_bytes_per_relu']:,.0f}"]
        for r in kernel_rows
    ]
    widths = [
        [r["model"], f"{r['comparisons_per_image']:,}", f"{r['widths'][0]}-{r['widths'][-1]}", f"{r['key_bytes_one_round']:,.0f}", f"{r['key_bytes_two_round']:,.0f}"]
        for r in width_rows
    ]
    return [
        ("One ReLU layer, batch 1, loopback (per ReLU; latency of the first batch, and the mean of the five after it)",
         ["protocol", "elements", "rounds", "B sent/party", "B online", "B offline/party", "1st batch s", "later batches s (mean)", "vs crypten"], end_to_end),
        ("The fss kernels on one core (fss: one-round ReLU; fss-compact: two-round)",
         ["ReLU", "n", "elements", "key gen pairs/s", "eval ReLU/s/party", "key B/ReLU/party"], kernels_),
        ("The demo models' comparisons at the widths their server settles (default settings)",
         ["model", "comparisons/image", "widths", "key B/comparison, fss", "key B/comparison, fss-compact"], widths),
    ]  # fmt: skip


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    for title, columns, rows in tables(result):
        table = Table(title=title)
        for col in columns:
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def targets(rows: list[dict], kernel_rows: list[dict], width_rows: list[dict]) -> dict[str, bool]:
    fss = [r for r in rows if r["protocol"] == "fss"]
    one = {r["bits"]: r for r in kernel_rows if r["relu"] == "one-round"}
    return {
        "fss: 1 round per ReLU layer": all(r["rounds"] == 1 for r in fss),
        "fss: at most 8 bytes sent per party per ReLU": all(r["bytes_sent_per_relu"] <= 8 for r in fss),
        "fss: key at most 2.1 KB per ReLU per party at n = 64": one[64]["key_bytes_per_relu"] <= 2100,
        "fss: evaluation >= 1e6 ReLU/s per party at n = 32": one[32]["eval_relu_per_s"] >= 1e6,
        "fss: key generation >= 2.5e5 pairs/s at n = 32": one[32]["keygen_pairs_per_s"] >= 2.5e5,
        "fss-compact: at most 600 B per comparison per party at the demo models' widths": all(
            r["key_bytes_two_round"] <= 600 for r in width_rows
        ),
    }


def markdown(result: dict, command: str) -> str:
    """The tables as markdown, for docs/benchmarks/ (written by the run, never by hand)."""
    lines = [
        "# Secure comparisons: rounds, bytes and keys per protocol", "",
        f"Written by `{command}` (every figure measured in that run; {result['cpus']}-core machine, loopback, three local processes).",
    ]  # fmt: skip
    for title, columns, rows in tables(result):
        lines += ["", f"{title}:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Targets:", ""] + [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in result["targets"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--protocols", default="crypten,fss,fss-compact")
    parser.add_argument("--out", type=Path, default=Path("results/comparison_protocols.json"))
    parser.add_argument("--report", type=Path, default=None, help="also write the tables as markdown here (docs/benchmarks/comparison_protocols.md)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    rows = [end_to_end(n, p) for n in args.sizes for p in protocols]
    n = min(max(args.sizes), 100_000)
    kernel_rows = [kernels(n, bits, kind) for kind in ("one-round", "two-round") for bits in (16, 24, 32, 64)]
    width_rows = [model_widths(name) for name in ("fashion_cnn", "tiny_resnet")]
    met = targets(rows, kernel_rows, width_rows)
    result = {"end_to_end": rows, "kernels": kernel_rows, "model_widths": width_rows, "targets": met, "cpus": os.cpu_count(), "load": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print_tables(result)
    for name, ok in met.items():
        print(f"{'met ' if ok else 'MISSED'}  {name}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(markdown(result, "python benchmarks/comparison_protocols.py " + " ".join(argv if argv is not None else sys.argv[1:])))
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
