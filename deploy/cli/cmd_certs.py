"""`twinfer certs`: a CA and one certificate per party role, for `--tls DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make a CA and one TLS certificate and key per role (server, client, dealer)")
    p.add_argument("--out", type=Path, required=True, help="folder to write ca.pem, ca.key and <role>.pem/.key into")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config.certs import make_certs

    out = make_certs(args.out, days=args.days)
    print(f"wrote a CA and certificates for server, client and dealer to {out}")
    print("give each machine ca.pem and its own <role>.pem and <role>.key; keep ca.key offline")
    return 0
