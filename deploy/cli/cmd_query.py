"""`twinfer query`: one private inference against a standing server (`twinfer serve`)."""

from __future__ import annotations

import argparse
import json

import numpy as np

from twinfer.parties.errors import LocalError
from twinfer.parties.runtime.session import CLIENT

from ..launch.wiring import report_json
from .options import add_transport_args, positive_int, refuse_trusted_first_party, session_spec, tls_identity


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="private inference on a standing server: a session of its own, any time")
    p.add_argument("--server", required=True, help="the server's address (`twinfer serve --listen`)")
    p.add_argument("--dealer", required=True, help="the dealer's address (`twinfer dealer --listen`)")
    p.add_argument("--input", required=True, help=".npy array of samples, N x ...; or .npz with one array per model input by name (input_ids, attention_mask)")
    p.add_argument("--batch", type=positive_int, default=None, help="samples per private batch (default: all at once)")
    p.add_argument("--output", help="write the logits to this .npy file (its folder must exist and be writable)")
    p.add_argument("--json", action="store_true", help="print the session's report as JSON")
    p.add_argument("--tls", help="folder from `twinfer certs`: present client.pem, accept only a server and dealer signed by ca.pem")
    add_transport_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from twinfer.parties.runtime.model_file import check_output_path, load_input

    from ..serve.client import Client

    refuse_trusted_first_party(args, "query")
    check_output_path(args.output)  # before the session, not after it
    inputs = load_input(args.input)
    with Client(
        args.server, dealer=args.dealer, tls=tls_identity(args, CLIENT), spec=session_spec(args).replace(input_range=None),
    ) as client:  # fmt: skip
        report = client.session(inputs, args.batch)
    if args.output:
        try:
            np.save(args.output, report.logits)
        except OSError as err:
            raise LocalError(f"cannot write the logits to --output {args.output}: {err}") from None
    if args.json:
        print(json.dumps(report_json(report, client.last_session)))
    else:
        print("argmax per sample:", " ".join(str(int(i)) for i in report.logits.argmax(axis=1)))
        print(f"session {client.last_session}: {sum(report.batch_latency_s):.3f} s, {sum(report.batch_rounds)} rounds")
    return 0
