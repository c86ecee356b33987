"""`twinfer infer`: run a model privately on an input file, all three parties on Ray."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from twinfer.protocols.roles import CLIENT, DEALER, SERVER
from twinfer.parties.runtime.model_file import load_input

from .options import add_input_range_arg, add_insecure_arg, add_transport_args, positive_int, run_private_inference
from .report import predicted_beside_measured, print_predicted_beside_measured, print_table, summary_rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="private inference: server, client and dealer as Ray actors")
    p.add_argument("--model", required=True, help="ONNX model file (the server's)")
    p.add_argument("--input", required=True, help=".npy array of samples, N x ... (the client's); or .npz with one array per model input by name (input_ids, attention_mask)")
    p.add_argument("--batch", type=positive_int, default=None, help="samples per private batch, at least 1 (default: all at once)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    add_placement_args(p)
    p.add_argument("--tls", default=None, help="folder from `twinfer certs`: mutual TLS on every link")
    add_input_range_arg(p, "")
    add_insecure_arg(p)
    add_transport_args(p)
    p.set_defaults(func=run)


def add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--placement", default="auto", choices=["auto", "spread", "pack"],
        help="auto: one party per node when the Ray cluster has three or more (default); spread: require that; pack: share",
    )  # fmt: skip
    for role in (SERVER, CLIENT, DEALER):
        p.add_argument(f"--{role}-node", default=None, help=f"run the {role} on this Ray node id, or where this custom resource is")


def run(args: argparse.Namespace) -> int:
    inputs = load_input(args.input)
    result = run_private_inference(args, args.model, inputs)
    predicted = _predicted(args.model)
    cmp = None if predicted is None else predicted_beside_measured(predicted, result.client.layers, result.client.batch_latency_s)
    if args.json:
        print(json.dumps(result.to_json_dict() | ({} if cmp is None else {"predicted_beside_measured": cmp})))
        return 0
    console = Console()
    if result.logits.shape[1] == 1:  # one logit (e.g. a click or rating model): argmax is always 0
        console.print("logit per sample:", " ".join(f"{float(v):.4f}" for v in result.logits[:, 0]))
    else:
        console.print("argmax per sample:", " ".join(str(int(i)) for i in result.logits.argmax(axis=1)))
    print_table("twinfer private inference", summary_rows(result.summary()), console)
    if cmp is not None:
        network = result.network.describe() if result.network is not None else "no --network"
        if result.batch_size != 1 or cmp["protocol"] != result.client.protocol or cmp["network"] != network:
            console.print(
                f"[yellow]the artifact's prediction is for batch 1 on {cmp['protocol']} under {cmp['network']}; "
                f"this run: batch {result.batch_size} on {result.client.protocol}, {network}[/]"
            )
        print_predicted_beside_measured(cmp, console)
    parties = ", ".join(f"{r.role} pid {r.pid}" for r in result.reports.values())
    console.print(f"parties: {parties}")
    return 0


def _predicted(model: str) -> dict | None:
    """The artifact's `cost_predicted` (written by `twinfer optimize --network/--latency-budget`), if any."""
    manifest = Path(model) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text()).get("cost_predicted")
    except ValueError:
        return None  # read_model_bytes has already checked the artifact; a bad manifest fails there
