"""`twinfer serve`: a standing server; clients open sessions on it whenever they like (`twinfer query`)."""

from __future__ import annotations

import argparse

from twinfer.parties.runtime.session import SERVER, PartyConfig, check_listen

from .cmd_party import announce
from .options import (
    add_input_range_arg, add_insecure_arg, add_standing_args, positive_int, refuse_trusted_first_party, session_spec,
    tls_identity,
)  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a standing server: sessions on demand, in a pool of worker processes")
    p.add_argument("--model", required=True, help="ONNX model file or artifact; loaded once by each worker")
    p.add_argument("--dealer", help="the standing dealer's address (`twinfer dealer`)")
    p.add_argument("--workers", type=positive_int, default=None, help="worker processes (default: one per core)")
    p.add_argument(
        "--max-sessions", type=positive_int, default=None,
        help="sessions running at once; past it a client is refused as busy (exit code 8). Default: 4 per worker",
    )  # fmt: skip
    p.add_argument(
        "--worker-ports", type=positive_int, default=None, metavar="BASE",
        help="worker i listens on port BASE+i of the --listen host (default: ports they pick); clients dial these too",
    )  # fmt: skip
    add_input_range_arg(p, "")
    add_standing_args(p, SERVER, default_listen="127.0.0.1:7700")
    add_insecure_arg(p)
    # Open hands out a session the client dials at once: a worker waits for it this long, not 120 s.
    p.set_defaults(func=run, accept_timeout=15.0)


def run(args: argparse.Namespace) -> int:
    from twinfer.parties.runtime.model_file import read_model_bytes

    from ..serve.lifecycle import run_until_stopped
    from ..serve.service import StandingServer

    refuse_trusted_first_party(args, "serve")
    if args.dealer is None:
        raise ValueError("twinfer serve needs --dealer HOST:PORT (a running `twinfer dealer`)")
    template = PartyConfig(
        role=SERVER, session_id="-", spec=session_spec(args), listen=args.listen, dealer_address=args.dealer,
        tls=tls_identity(args, SERVER),
    )  # fmt: skip
    check_listen(args.listen, template.tls, args.insecure, SERVER)  # before the model is read: the cheaper mistake first
    server = StandingServer(
        read_model_bytes(args.model), template, listen=args.listen, workers=args.workers, max_sessions=args.max_sessions,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, worker_port_base=args.worker_ports,
    )  # fmt: skip
    try:
        address = server.start()
    except BaseException:
        server.close()
        raise
    if server.metrics_port is not None:
        print(f"metrics on http://{args.metrics_host}:{server.metrics_port}/metrics", flush=True)
    announce(args.address_file, SERVER, address)
    return run_until_stopped(server, args.drain_timeout)
