"""`twinfer party`: run one party by hand, for machines without Ray."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from twinfer.parties.session import CLIENT, DEALER, SERVER, PartyConfig

from .cli import add_transport_args, transport_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("party", help="run one party (server, client or dealer) without Ray")
    p.add_argument("--config", help="YAML or TOML file with this party's settings (keys: the flags below); flags win")
    p.add_argument("--role", choices=[SERVER, CLIENT, DEALER], help="required, here or in the config")
    p.add_argument("--session", help="session id; every party of a session uses the same (required, here or in the config)")
    p.add_argument("--listen", default="127.0.0.1:0", help="server and dealer: address to listen on (port 0 picks one)")
    p.add_argument("--address-file", help="server and dealer: write the bound address here once listening")
    p.add_argument("--server", help="client: the server's address")
    p.add_argument("--dealer", help="server and client: the dealer's address")
    p.add_argument("--model", help="server: ONNX model file")
    p.add_argument("--input", help="client: .npy array of samples")
    p.add_argument("--batch", type=int, default=None, help="client: samples per batch (default: all)")
    p.add_argument("--output", help="client: write the logits to this .npy file")
    p.add_argument("--json", action="store_true", help="print this party's report as JSON")
    p.add_argument("--audit-log", help="record files opened and plaintexts revealed in this process (for tests)")
    p.add_argument("--tls", help="folder from `twinfer certs`: present <role>.pem, accept only peers signed by ca.pem")
    add_transport_args(p)
    p.set_defaults(func=run)


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        where = " (or the keys in the config file)" if getattr(args, "config", None) else ""
        who = f"--role {args.role}" if args.role else "twinfer party"
        raise ValueError(f"{who} needs {', '.join(missing)}{where}")


def _apply_config(args: argparse.Namespace) -> None:
    """Settings from --config where the command line left the default."""
    from .cli import build_parser
    from .party_config import load_party_config

    defaults = vars(build_parser().parse_args(["party"]))
    for key, value in load_party_config(args.config).items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)
    if args.role not in (SERVER, CLIENT, DEALER):
        raise ValueError(f"{args.config}: key 'role' must be server, client or dealer, got {args.role!r}")


def _tls(args: argparse.Namespace):
    from twinfer.parties.tls import TlsIdentity

    if args.tls is None:
        return None
    if isinstance(args.tls, dict):  # from a config file: explicit files
        return TlsIdentity.from_files(args.role, args.tls["ca"], args.tls["cert"], args.tls["key"])
    return TlsIdentity.from_dir(args.tls, args.role)


def run(args: argparse.Namespace) -> int:
    if args.config:
        _apply_config(args)
    _require(args, "role", "session")
    audit = None
    if args.audit_log:
        from twinfer.parties.audit import Audit

        audit = Audit().install()
    try:
        report = _run_party(args)
    finally:
        if audit is not None:
            audit.write(args.audit_log)
    if args.json:
        out = asdict(report)
        out["logits"] = None if report.logits is None else report.logits.tolist()
        print(json.dumps(out))
    return 0


def _announce(args: argparse.Namespace, address: str) -> None:
    if args.address_file:
        tmp = Path(args.address_file + ".tmp")
        tmp.write_text(address)
        tmp.rename(args.address_file)  # readers never see a half-written address
    else:
        print(f"{args.role} listening on {address}", flush=True)


def _run_party(args: argparse.Namespace):
    from twinfer.parties.model_file import load_input, load_model
    from twinfer.parties.session import ClientParty, DealerParty, ServerParty

    options = transport_options(args)
    tfp = args.insecure_trusted_first_party
    tls = _tls(args)

    def config(**kw) -> PartyConfig:
        return PartyConfig(
            role=args.role, session_id=args.session, options=options, insecure_trusted_first_party=tfp, tls=tls, **kw
        )

    if args.role == DEALER:
        party = DealerParty(config(listen=args.listen))
        _announce(args, party.address)
        return party.run()
    if not tfp:
        _require(args, "dealer")
    if args.role == SERVER:
        _require(args, "model")
        graph, weights = load_model(args.model)
        party = ServerParty(graph, weights, config(listen=args.listen, dealer_address=args.dealer))
        _announce(args, party.address)
        return party.run()
    _require(args, "server", "input")
    inputs = load_input(args.input)
    party = ClientParty(inputs, args.batch or len(inputs), config(server_address=args.server, dealer_address=args.dealer))
    report = party.run()
    if args.output:
        np.save(args.output, report.logits)
    return report
