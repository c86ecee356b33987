"""`twinfer dealer`: a standing dealer; it learns each session's id from the session's two parties."""

from __future__ import annotations

import argparse

from twinfer.parties.runtime.session import DEALER

from .cmd_party import announce
from .options import add_insecure_arg, add_standing_args, positive_int, refuse_trusted_first_party, tls_identity, transport_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dealer", help="a standing dealer for `twinfer serve`: sessions opened as their parties ask")
    p.add_argument(
        "--max-sessions", type=positive_int, default=256,
        help="sessions open at once; past it a party is refused as busy (default 256)",
    )  # fmt: skip
    add_standing_args(p, DEALER, default_listen="127.0.0.1:7702")
    add_insecure_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..serve.dealer import StandingDealer
    from ..serve.lifecycle import run_until_stopped

    refuse_trusted_first_party(args, "dealer")
    dealer = StandingDealer(
        args.listen, transport_options(args), tls=tls_identity(args, DEALER), insecure=args.insecure,
        max_sessions=args.max_sessions, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
    )  # fmt: skip
    if dealer.metrics_port is not None:
        print(f"metrics on http://{args.metrics_host}:{dealer.metrics_port}/metrics", flush=True)
    announce(args.address_file, DEALER, dealer.address)
    return run_until_stopped(dealer, args.drain_timeout)
