"""`twinfer demo`: train (or reuse) a Fashion-MNIST CNN and classify test images privately."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from rich.console import Console

from twinfer.optimizer.data.datasets import load_fashion_mnist
from twinfer.optimizer.zoo.demo_models import INPUT_SCALE, load_or_train_demo_model

from ..config.paths import cache_dir
from .options import add_insecure_arg, add_transport_args, positive_int, run_private_inference
from .report import print_table, summary_rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small Fashion-MNIST CNN and run private inference on test images")
    p.add_argument(
        "--model", default="fashion_cnn", choices=["fashion_cnn", "tiny_resnet", "pixel_cnn"],
        help="fashion_cnn (default), tiny_resnet (BatchNorm after a ReLU, a residual add), pixel_cnn (raw 0-255 pixels)",
    )  # fmt: skip
    p.add_argument("--samples", type=positive_int, default=64, help="test images to classify privately (default 64)")
    p.add_argument("--batch", type=positive_int, default=32, help="images per private batch (default 32)")
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
    console = Console(stderr=args.json)
    model = load_or_train_demo_model(args.model, cache_dir() / "models", progress=not args.json)
    images, labels = load_fashion_mnist("test")
    images, labels = images[: args.samples] * INPUT_SCALE.get(args.model, 1.0), labels[: args.samples]
    with torch.no_grad():
        reference = model(torch.from_numpy(images)).numpy()
    console.print(f"[bold]{args.model}[/bold]: {args.samples} Fashion-MNIST test images, private inference over gRPC")
    result = run_private_inference(args, model, images)
    quality = compare(result.logits, reference, labels)
    if args.json:
        print(json.dumps(quality | result.summary()))
        return 0
    rows = [
        ("plaintext accuracy (PyTorch)", f"{quality['plaintext_accuracy']:.3f}"),
        ("private accuracy", f"{quality['private_accuracy']:.3f}"),
        ("argmax agreement", f"{quality['argmax_agreement']:.3f}"),
        ("max |logit error|", f"{quality['max_abs_logit_error']:.5f}"),
    ] + summary_rows(result.summary())
    print_table("twinfer demo", rows, console)
    console.print("parties: " + ", ".join(f"{r.role} (pid {r.pid})" for r in result.reports.values()))
    return 0
