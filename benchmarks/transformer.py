"""Transformers privately: a BERT-class encoder classifier on crypten, fss and fss-compact.

A BERT encoder from `transformers` (random weights, seed 0: latency and bytes do not depend
on training), mean pooling, a linear head; exported by `torch.onnx.export` (TorchScript, opset
17) and run by twinfer in three local processes with the link shaped in its transport
(`twinfer bench latency`'s `measure`), one sentence a batch, the second batch measured (the
first fetches its correlations on demand). Models: `bert_2x64` (2 layers, hidden 64, 4 heads,
16 tokens, the tests' model) and `minilm_6x384` (MiniLM-L6's shape: 6 layers, hidden 384, 12
heads, FFN 1536, 32 tokens; a vocabulary of --vocab rows, 1,000 by default, since the
private lookup's cost is linear in it: MiniLM's own 30,522 multiplies that layer's bytes by 30).
Prints JSON, a table per run (latency, lower bound, rounds, online and offline bytes, the
logit error against plaintext) and, from the cost model (which the tests hold equal to the
measured counters), rounds and bytes per op kind.

    python benchmarks/transformer.py [--models bert_2x64 minilm_6x384] [--networks loopback wan] [--out results/transformer.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

PROTOCOLS = ("crypten", "fss", "fss-compact")
SHAPES = {
    "bert_2x64": dict(layers=2, hidden=64, heads=4, ffn=128, tokens=16),
    "minilm_6x384": dict(layers=6, hidden=384, heads=12, ffn=1536, tokens=32),
}


def build(name: str, vocab: int):
    """(the torch classifier, its ONNX bytes, token count)."""
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    s = SHAPES[name]
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=s["ffn"], max_position_embeddings=max(64, s["tokens"]), attn_implementation="eager",
    )  # fmt: skip

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert, self.head = BertModel(config, add_pooling_layer=False), nn.Linear(s["hidden"], 4)

        def forward(self, ids):
            return self.head(self.bert(input_ids=ids).last_hidden_state.mean(dim=1))

    model = Classifier().eval()
    buffer = io.BytesIO()
    ids = torch.zeros(1, s["tokens"], dtype=torch.int64)
    torch.onnx.export(model, (ids,), buffer, dynamo=False, opset_version=17, input_names=["input_ids"], output_names=["logits"])
    return model, buffer.getvalue(), s["tokens"]


def per_op_kind(onnx_bytes: bytes, protocol: str) -> dict[str, dict[str, float]]:
    """The cost model's rounds, online and offline bytes per op kind, one sentence."""
    import onnx

    from twinfer.deploy.cli.report import op_kind
    from twinfer.protocols.cost_model import graph_cost
    from twinfer.protocols.passes.onnx_import import graph_from_onnx

    graph, _ = graph_from_onnx(onnx.load_from_string(onnx_bytes))
    kinds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for cost in graph_cost(graph, batch=1, protocol=protocol)[:-1]:
        kind = op_kind(cost.op)
        for key in ("rounds", "bytes_online", "comparisons"):
            kinds[kind][key] += getattr(cost, key)
        kinds[kind]["bytes_offline"] += cost.bytes_offline or 0
    return {k: dict(v) for k, v in kinds.items()}


def run(models: list[str], networks: list[str], vocab: int) -> list[dict]:
    import numpy as np
    import torch

    from twinfer.deploy.bench.latency import measure
    from twinfer.parties.wire.network_profile import parse_profile

    rows = []
    for name in models:
        model, onnx_bytes, tokens = build(name, vocab)
        ids = np.random.default_rng(1).integers(0, vocab, (2, tokens)).astype(np.int64)
        with torch.no_grad():
            expected = model(torch.from_numpy(ids)).numpy()
        for network in networks:
            for protocol in PROTOCOLS:
                r = measure(name, onnx_bytes, (tokens,), parse_profile(network), batch=1, reps=1, protocol=protocol, inputs=ids)
                r.pop("layers_per_batch")
                r["logit_error"] = float(np.abs(np.asarray(r.pop("logits")) - expected).max())
                rows.append(r | {"ops": per_op_kind(onnx_bytes, protocol)})
                print(f"{name} {protocol} {network}: {r['latency_s']:.3f} s, {r['rounds']} rounds", file=sys.stderr, flush=True)
    return rows


def print_tables(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(title="one sentence a batch, three local processes (the second batch)")
    for col in ("model", "protocol", "link", "latency s", "vs crypten", "bound s", "rounds", "online MB", "offline MB (client's)", "comparisons", "logit error"):
        table.add_column(col, justify="right")
    for r in rows:
        base = next((b for b in rows if (b["model"], b["profile"], b["protocol"]) == (r["model"], r["profile"], "crypten")), None)
        table.add_row(
            r["model"], r["protocol"], r["profile"], f"{r['latency_s']:.3f}", f"{base['latency_s'] / r['latency_s']:.1f}x" if base else "-",
            f"{r['lower_bound_s']:.3f}", str(r["rounds"]), f"{r['bytes_online'] / 1e6:.1f}", f"{r['bytes_offline_per_batch'] / 1e6:.1f}",
            str(r["comparisons"]), f"{r['logit_error']:.2e}",
        )  # fmt: skip
    console.print(table)
    seen = set()
    for r in rows:
        if (r["model"], r["protocol"]) in seen:
            continue
        seen.add((r["model"], r["protocol"]))
        kinds = Table(title=f"{r['model']} on {r['protocol']}, per op kind (cost model, one sentence)")
        for col in ("op", "rounds", "online MB", "offline MB (both parties)", "comparisons"):
            kinds.add_column(col, justify="right")
        for op, c in sorted(r["ops"].items(), key=lambda kv: -kv[1]["rounds"]):
            kinds.add_row(op, f"{c['rounds']:.0f}", f"{c['bytes_online'] / 1e6:.2f}", f"{c['bytes_offline'] / 1e6:.1f}", f"{c['comparisons']:.0f}")
        console.print(kinds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert_2x64"], choices=sorted(SHAPES))
    parser.add_argument("--networks", nargs="+", default=["loopback", "wan"])
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("results/transformer.json"))
    parser.add_argument("--tables-from", type=Path, default=None, help="print the tables of an earlier run's JSON, running nothing")
    args = parser.parse_args(argv)
    rows = json.loads(args.tables_from.read_text())["rows"] if args.tables_from else run(args.models, args.networks, args.vocab)
    if not args.tables_from:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=1, default=str))
        print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "ops"} for r in rows]}, default=str))
    print_tables(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
