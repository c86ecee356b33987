"""A transformer's secure ops one at a time, at MiniLM-L6's sizes, on every backend.

GeLU over 49,152 elements (32 tokens x the FFN's 1,536), softmax over 12 x 32 rows of 32 (one
layer's attention), LayerNorm of 32 x 384, the private lookup of 32 token ids in MiniLM's
30,522 x 384 table: each op alone as an ONNX model (torch.onnx.export),
run by twinfer in three local processes (`twinfer bench latency`'s `measure`, loopback, one
sample a batch, the second batch measured; the encoding settled on these inputs, as `twinfer
infer` settles it), with twinfer's method for it
(`protocols/ops/approximations.py`) on crypten, fss and fss-compact. Prints JSON and a table:
latency against crypten's in the same run, rounds, online and dealer bytes, and the largest
error against torch. CrypTen's own stock functions (its softmax, its Taylor erf) are not run
here: they fail on these inputs (issue 23, research note transformers.md).

    python benchmarks/transformer_ops.py [--ops gelu softmax layer_norm lookup] [--out results/transformer_ops.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROTOCOLS = ("crypten", "fss", "fss-compact")
OPS = ("gelu", "softmax", "layer_norm", "lookup")


def build(op: str):
    """(module, one sample's shape, two samples drawn as the op sees them in MiniLM)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    if op == "gelu":  # the FFN's pre-activations reach -12 to 17 (issue 23)
        shape, module, scale = (32, 1536), torch.nn.GELU(), 3.0
    elif op == "softmax":
        shape, module, scale = (12, 32, 32), torch.nn.Softmax(dim=-1), 3.0
    elif op == "layer_norm":
        torch.manual_seed(0)
        module = torch.nn.LayerNorm(384, eps=1e-12)
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.1, 0.1)
        shape, scale = (32, 384), 2.0
    elif op == "lookup":  # 32 token ids: their one-hot rows times the server's table, one Beaver product
        torch.manual_seed(0)
        return torch.nn.Embedding(30522, 384).eval(), (32,), rng.integers(0, 30522, (2, 32)).astype(np.int64)
    else:
        raise ValueError(f"unknown op {op!r}; one of {', '.join(OPS)}")
    return module.eval(), shape, (rng.normal(0, scale, (2, *shape))).astype(np.float32)


def run(ops: list[str]) -> list[dict]:
    import numpy as np
    import torch

    from twinfer.deploy.bench.latency import measure
    from twinfer.parties.wire.network_profile import parse_profile
    from twinfer.protocols.passes.onnx_export import export_onnx

    rows = []
    for op in ops:
        module, shape, inputs = build(op)
        example = torch.zeros(1, *shape, dtype=torch.int64 if op == "lookup" else torch.float32)
        onnx_bytes = export_onnx(module, example)
        with torch.no_grad():
            expected = module(torch.from_numpy(inputs)).numpy()
        for protocol in PROTOCOLS:
            r = measure(op, onnx_bytes, shape, parse_profile("loopback"), batch=1, reps=1, protocol=protocol, inputs=inputs, settle=True)
            r.pop("layers_per_batch")
            r["error"] = float(np.abs(np.asarray(r.pop("logits")).reshape(expected.shape) - expected).max())  # both batches
            r["elements"] = int(np.prod(shape))
            rows.append(r)
            print(f"{op} {protocol}: {r['latency_s']:.3f} s, {r['rounds']} rounds", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="one op at MiniLM-L6's sizes, loopback, one sample (the second batch)")
    for col in ("op", "elements", "protocol", "latency s", "vs crypten", "rounds", "online MB", "dealer MB (client's)", "max error"):
        table.add_column(col, justify="right")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["protocol"] == "crypten")
        table.add_row(
            r["model"], str(r["elements"]), r["protocol"], f"{r['latency_s']:.3f}", f"{base['latency_s'] / r['latency_s']:.1f}x",
            str(r["rounds"]), f"{r['bytes_online'] / 1e6:.2f}", f"{r['bytes_offline_per_batch'] / 1e6:.1f}", f"{r['error']:.1e}",
        )  # fmt: skip
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.ops)
    print(json.dumps(rows))
    print_table(rows)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
