"""`twinfer demo`: train (or reuse) a Fashion-MNIST CNN and classify test images privately."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from rich.console import Console

from twinfer.deploy.console import new_console
from twinfer.optimizer.data.datasets import load_fashion_mnist
from twinfer.optimizer.zoo.demo_models import INPUT_SCALE, load_or_train_demo_model
from twinfer.parties.runtime.model_file import parse_model

from ..config.paths import cache_dir
from .options import add_insecure_arg, add_transport_args, positive_int, run_private_inference
from .report import per_op_kind, print_op_kinds, print_table, summary_rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small Fashion-MNIST CNN and run private inference on test images")
    p.add_argument(
        "--model", default="fashion_cnn", choices=["fashion_cnn", "tiny_resnet", "pixel_cnn", "minilm"],
        help="fashion_cnn (default), tiny_resnet (BatchNorm after a ReLU, a residual add), pixel_cnn (raw 0-255 pixels), "
        "minilm (all-MiniLM-L6-v2 with a head fitted on BBC News: headlines classified privately, their mask public)",
    )  # fmt: skip
    p.add_argument("--samples", type=positive_int, default=None, help="test images (default 64) or headlines (default 4) to classify privately")
    p.add_argument("--batch", type=positive_int, default=None, help="samples per private batch (default 32 images, 1 headline)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    add_insecure_arg(p)
    add_transport_args(p)
    p.set_defaults(func=run)


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How the private logits compare with plaintext PyTorch on the same images."""
    return {
        "plaintext_accuracy": float((reference.argmax(1) == labels).mean()),
        "private_accuracy": float((logits.argmax(1) == labels).mean()),
        "argmax_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "max_abs_logit_error": float(np.abs(logits - reference).max()),
    }


def run(args: argparse.Namespace) -> int:
    console = new_console(stderr=args.json)
    if args.model == "minilm":
        return run_minilm(args, console)
    args.samples, args.batch = args.samples or 64, args.batch or 32
    model = load_or_train_demo_model(args.model, cache_dir() / "models", progress=not args.json)
    images, labels = load_fashion_mnist("test")
    images, labels = images[: args.samples] * INPUT_SCALE.get(args.model, 1.0), labels[: args.samples]
    with torch.no_grad():
        reference = model(torch.from_numpy(images)).numpy()
    console.print(f"[bold]{args.model}[/bold]: {args.samples} Fashion-MNIST test images, private inference over gRPC")
    result = run_private_inference(args, model, images)
    return _report(args, console, result, compare(result.logits, reference, labels))


def run_minilm(args: argparse.Namespace, console: Console) -> int:
    """Headlines of held-out BBC News articles: token ids secret, attention mask public."""
    from twinfer.optimizer.data.text import headline
    from twinfer.optimizer.zoo.minilm import load_or_fit_minilm

    args.samples, args.batch = args.samples or 4, args.batch or 1
    classifier = load_or_fit_minilm(cache_dir() / "models")
    headlines = [headline(text) for text in classifier.test_texts[: args.samples]]
    inputs = classifier.inputs(headlines)
    reference = classifier.plaintext(inputs)
    console.print(
        f"[bold]minilm[/bold]: {len(headlines)} BBC News headlines ({classifier.tokens} tokens each, "
        f"{', '.join(str(int(n)) for n in inputs['attention_mask'].sum(1))} of them real), private inference over gRPC"
    )
    result = run_private_inference(args, classifier.onnx, inputs)
    graph, _ = parse_model(classifier.onnx)
    kinds = per_op_kind({n.name: n.op for n in graph.nodes}, result.client.layers)
    return _report(args, console, result, compare(result.logits, reference, classifier.test_labels[: args.samples]), kinds)


def _report(args: argparse.Namespace, console: Console, result, quality: dict[str, float], kinds: dict | None = None) -> int:
    if args.json:
        print(json.dumps(quality | result.summary() | ({"op_kinds": kinds} if kinds else {})))
        return 0
    rows = [
        ("plaintext accuracy (PyTorch)", f"{quality['plaintext_accuracy']:.3f}"),
        ("private accuracy", f"{quality['private_accuracy']:.3f}"),
        ("argmax agreement", f"{quality['argmax_agreement']:.3f}"),
        ("max |logit error|", f"{quality['max_abs_logit_error']:.5f}"),
    ] + summary_rows(result.summary())
    print_table("twinfer demo", rows, console)
    if kinds:
        print_op_kinds("per op kind (the client's, all batches)", kinds, console)
    console.print("parties: " + ", ".join(f"{r.role} (pid {r.pid})" for r in result.reports.values()))
    return 0
