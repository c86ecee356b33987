"""`twinfer infer`: run a model privately on an input file, all three parties on Ray."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from twinfer.deploy.console import new_console
from twinfer.protocols.artifact import Artifact
from twinfer.protocols.roles import CLIENT, DEALER, SERVER
from twinfer.parties.errors import InputError
from twinfer.parties.runtime.model_file import load_input, read_model_bytes

from .options import add_input_range_arg, add_insecure_arg, add_transport_args, positive_int, run_private_inference
from .report import predicted_beside_measured, print_predicted_beside_measured, print_table, summary_rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="private inference: server, client and dealer as Ray actors")
    p.add_argument("--model", required=True, help="ONNX model file (the server's)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", help=".npy array of samples, N x ... (the client's); or .npz with one array per model input by name (input_ids, attention_mask)")
    given.add_argument("--text", help="a text file, one sentence a line, tokenised on the client with --tokenizer (a BERT-class model with its attention mask)")
    p.add_argument("--tokenizer", help="with --text: the model's tokenizer.json (Hugging Face `tokenizers`)")
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


def text_inputs(model: str, text: str, tokenizer: str | None) -> dict[str, np.ndarray]:
    """The lines of `text` tokenised as the model takes them: its first input the token ids (cut or
    padded to its length), its one other input the attention mask (public: which tokens are padding)."""
    from twinfer.optimizer.data.text import tokenize

    if not tokenizer:
        raise InputError("--text needs --tokenizer: the model's tokenizer.json")
    if not Path(tokenizer).is_file():
        raise InputError(f"tokenizer file {tokenizer} does not exist")
    try:
        lines = [line.strip() for line in Path(text).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read --text {text}: {err}") from None
    if not lines:
        raise InputError(f"--text {text} holds no sentence (one a line)")
    graph = onnx.load_from_string(read_model_bytes(model)).graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 2:
        raise InputError(
            f"--text is for a model that takes token ids and their attention mask; this one takes {[i.name for i in inputs]}: "
            "without a mask its padding would be attended to (export the model with its attention_mask)"
        )
    tokens = inputs[0].type.tensor_type.shape.dim[-1].dim_value
    if tokens <= 0:
        raise InputError(f"the model's input '{inputs[0].name}' has no fixed length to tokenise to; export it with one")
    encoded = tokenize(Path(tokenizer), lines, tokens)
    return {inputs[0].name: encoded["input_ids"], inputs[1].name: encoded["attention_mask"]}


def run(args: argparse.Namespace) -> int:
    inputs = text_inputs(args.model, args.text, args.tokenizer) if args.text else load_input(args.input)
    result = run_private_inference(args, args.model, inputs)
    predicted = _predicted(args.model)
    cmp = None if predicted is None else predicted_beside_measured(predicted, result.client.layers, result.client.batch_latency_s)
    if args.json:
        print(json.dumps(result.to_json_dict() | ({} if cmp is None else {"predicted_beside_measured": cmp})))
        return 0
    console = new_console()
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
    if not Artifact.is_artifact(model):
        return None
    return Artifact.read(model).manifest.get("cost_predicted")  # read_model_bytes has already checked it