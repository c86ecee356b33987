"""Options several subcommands share, and how a parsed command line becomes launcher settings."""

from __future__ import annotations

import argparse

import numpy as np

from twinfer.protocols.backends import DEFAULT_PROTOCOL, protocols
from twinfer.parties.wire.network_profile import parse_profile
from twinfer.parties.runtime.session import CLIENT, DEALER, SERVER
from twinfer.parties.wire.transport import TransportOptions

from ..launch.inference import InferenceResult, ModelLike, private_inference
from ..launch.ray_launcher import RayOptions


def add_transport_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of every network wait, seconds (default 60)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="deadline to reach a peer, seconds (default 10)")
    parser.add_argument(
        "--accept-timeout",
        type=float,
        default=120.0,
        help="how long a listening party waits for its peer to dial in, seconds (default 120)",
    )
    parser.add_argument(
        "--network",
        default=None,
        help="shape the client<->server link, per direction: loopback, lan, wan, mobile, or 'rtt=40ms,bw=100mbit'",
    )
    parser.add_argument("--dealer-network", default=None, help="shape the dealer's link to each party (same forms)")
    parser.add_argument(
        "--protocol",
        default=DEFAULT_PROTOCOL,
        choices=protocols(),
        help="the secure backend: crypten (CrypTen's protocols, the default) or fss (one-round ReLU from "
        "the dealer's DCF keys, weights opened once); every party of a session must use the same",
    )
    parser.add_argument(
        "--insecure-trusted-first-party",
        action="store_true",
        help="INSECURE: the server makes the correlated randomness itself (CrypTen TFP) and could "
        "learn the client's input; for development only. Default: a separate dealer process.",
    )


def transport_options(args: argparse.Namespace) -> TransportOptions:
    return TransportOptions(
        recv_timeout_s=args.timeout,
        connect_timeout_s=args.connect_timeout,
        accept_timeout_s=args.accept_timeout,
        network=parse_profile(args.network) if args.network else None,
        dealer_network=parse_profile(args.dealer_network) if args.dealer_network else None,
    )


def ray_options_from_args(args) -> RayOptions:
    """RayOptions from --ray-address, --placement and --<role>-node (where a command has them)."""
    nodes = {role: getattr(args, f"{role}_node", None) for role in (SERVER, CLIENT, DEALER)}
    return RayOptions(
        address=args.ray_address,
        placement=getattr(args, "placement", "auto"),
        nodes={role: node for role, node in nodes.items() if node},
    )


def run_private_inference(args, model: ModelLike, inputs: np.ndarray) -> InferenceResult:
    """private_inference with the options of a parsed command line (infer, demo)."""
    return private_inference(
        model,
        inputs,
        batch_size=args.batch,
        options=transport_options(args),
        insecure_trusted_first_party=args.insecure_trusted_first_party,
        protocol=args.protocol,
        ray_options=ray_options_from_args(args),
        tls_dir=getattr(args, "tls", None),
        progress=not args.json,
    )
