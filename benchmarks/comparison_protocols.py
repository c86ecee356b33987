"""Secure comparisons per protocol: one ReLU layer of 1e4, 1e5 and 1e6 elements, fss beside crypten.

Two parts, both measured in this run:

1. End to end: a one-layer ReLU model runs privately (dealer, server and client processes over
   gRPC on loopback, batch 1, three batches: the first records the dealer requests, the
   second's are prefetched as it starts, the third's while the second runs) on each backend.
   From the ReLU layer's own counters: online rounds, online bytes sent per party per ReLU,
   offline bytes from the dealer per party per ReLU (the mean of the two parties'); and the
   latency of the first and of the last batch (share the input, the layer, reveal).
2. The fss kernels on one core: the dealer's key generation rate (ReLU key pairs per second)
   and one party's evaluation rate (ReLUs per second, given the opened x + r), and the key
   bytes per ReLU per party, at comparison widths n = 31 (32-bit values) and n = 63 (64-bit).

Targets (issue 13): fss 1 round and at most 8 bytes sent per party per ReLU at 64 bits; a key
of at most 2.1 KB per ReLU per party at n = 63; at n = 31 evaluation >= 1e6 ReLU/s per party
and key generation >= 2.5e5 pairs/s.

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
    import onnx
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
    from twinfer.parties.wire.transport import TransportOptions

    x = np.random.default_rng(n).normal(0, 4, (3, n)).astype(np.float32)
    options = TransportOptions(recv_timeout_s=600, connect_timeout_s=120)
    reports = run_local_session(_relu_model(n), x, 1, options=options, protocol=protocol, timeout_s=1200)
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
        "last_batch_s": client.batch_latency_s[-1],
        "comparisons": client.comparisons // batches,
    }


def kernels(n: int, bits: int) -> dict:
    """The fss dealer's and one party's ReLU kernels on this process's single core."""
    from twinfer.protocols.backends.fss.prg import AesCtrPrg
    from twinfer.protocols.backends.fss.relu import masked_share, relu_eval, relu_keys

    rng = AesCtrPrg()
    start = time.perf_counter()
    k0, k1 = relu_keys(n, bits, rng)
    keygen_s = time.perf_counter() - start
    half = 1 << (bits - 2)
    x = np.random.default_rng(bits).integers(-half, half, n, dtype=np.int64)
    share0 = np.random.default_rng(1).integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True)
    share1 = x - share0
    x_hat = masked_share(k0, share0) + masked_share(k1, share1)
    start = time.perf_counter()
    y0 = relu_eval(0, k0, x_hat)
    eval_s = time.perf_counter() - start
    y1 = relu_eval(1, k1, x_hat)
    assert np.array_equal((y0 + y1).view(np.int64), np.maximum(x, 0)), "fss ReLU is wrong"
    return {
        "elements": n,
        "bits": bits,
        "dcf_bits": bits - 1,
        "keygen_pairs_per_s": n / keygen_s,
        "eval_relu_per_s": n / eval_s,
        "key_bytes_per_relu": k0.nbytes / n,
    }


def print_tables(rows: list[dict], kernel_rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="one ReLU layer, batch 1, loopback (measured per ReLU, the second batch and on)")
    for col in ("protocol", "elements", "rounds", "B sent/party", "B online", "B offline/party", "1st batch s", "last batch s", "vs crypten"):
        table.add_column(col, justify="right")
    base = {r["elements"]: r for r in rows if r["protocol"] == "crypten"}
    for r in rows:
        ref = base.get(r["elements"])
        ratio = f"{r['last_batch_s'] / ref['last_batch_s']:.2f}x" if ref else "-"
        table.add_row(
            r["protocol"], f"{r['elements']:,}", f"{r['rounds']:g}", f"{r['bytes_sent_per_relu']:.1f}",
            f"{r['bytes_online_per_relu']:.1f}", f"{r['bytes_offline_per_relu']:.1f}", f"{r['first_batch_s']:.3f}",
            f"{r['last_batch_s']:.3f}", ratio,
        )  # fmt: skip
    console.print(table)
    table = Table(title="fss kernels, one core (measured)")
    for col in ("n (DCF bits)", "elements", "key gen pairs/s", "eval ReLU/s/party", "key B/ReLU/party"):
        table.add_column(col, justify="right")
    for r in kernel_rows:
        table.add_row(
            f"{r['dcf_bits']}", f"{r['elements']:,}", f"{r['keygen_pairs_per_s']:,.0f}", f"{r['eval_relu_per_s']:,.0f}",
            f"{r['key_bytes_per_relu']:,.0f}",
        )  # fmt: skip
    console.print(table)


def targets(rows: list[dict], kernel_rows: list[dict]) -> dict[str, bool]:
    fss = [r for r in rows if r["protocol"] == "fss"]
    n31 = [r for r in kernel_rows if r["dcf_bits"] == 31]
    n63 = [r for r in kernel_rows if r["dcf_bits"] == 63]
    return {
        "fss: 1 round per ReLU layer": all(r["rounds"] == 1 for r in fss),
        "fss: at most 8 bytes sent per party per ReLU": all(r["bytes_sent_per_relu"] <= 8 for r in fss),
        "fss: key at most 2.1 KB per ReLU per party at n = 63": all(r["key_bytes_per_relu"] <= 2100 for r in n63),
        "fss: evaluation >= 1e6 ReLU/s per party at n = 31": all(r["eval_relu_per_s"] >= 1e6 for r in n31),
        "fss: key generation >= 2.5e5 pairs/s at n = 31": all(r["keygen_pairs_per_s"] >= 2.5e5 for r in n31),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--protocols", default="crypten,fss")
    parser.add_argument("--out", type=Path, default=Path("results/comparison_protocols.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    rows = [end_to_end(n, p) for n in args.sizes for p in protocols]
    kernel_rows = [kernels(n, bits) for bits in (32, 64) for n in args.sizes if n <= 1_000_000]
    met = targets(rows, kernel_rows)
    result = {"end_to_end": rows, "kernels": kernel_rows, "targets": met, "cpus": os.cpu_count(), "load": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print_tables(rows, kernel_rows)
    for name, ok in met.items():
        print(f"{'met ' if ok else 'MISSED'}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
