"""`twinfer party`: run one party by hand, for machines without Ray."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np

from twinfer.parties.runtime.session import CLIENT, DEALER, SERVER, PartyConfig, PartyReport

from twinfer.parties.errors import LocalError

from ..config.party_config import load_party_config
from ..launch.wiring import SESSION_ID_BITS, report_json
from .options import add_input_range_arg, add_insecure_arg, add_transport_args, positive_int, session_spec, tls_identity


log = logging.getLogger(__name__)

SERVE_TIMEOUT_S = 24 * 3600.0  # a session's own network waits end it long before this


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("party", help="run one party (server, client or dealer) without Ray")
    add_party_args(p)
    p.set_defaults(func=run)


def add_party_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or TOML file with this party's settings (keys: the flags below); flags win")
    p.add_argument("--role", choices=[SERVER, CLIENT, DEALER], help="required, here or in the config")
    p.add_argument(
        "--session",
        help="session id; every party of a session uses the same (required, here or in the config). Server and "
        "dealer: several comma-separated ids serve those sessions at once on one listener",
    )
    p.add_argument("--listen", default="127.0.0.1:0", help="server and dealer: address to listen on (port 0 picks one)")
    p.add_argument("--address-file", help="server and dealer: write the bound address here once listening")
    p.add_argument("--server", help="client: the server's address")
    p.add_argument("--dealer", help="server and client: the dealer's address")
    p.add_argument("--model", help="server: ONNX model file")
    add_input_range_arg(p, "server: ")
    p.add_argument("--input", help="client: .npy array of samples, or .npz with one array per model input by name")
    p.add_argument("--batch", type=positive_int, default=None, help="client: samples per batch, at least 1 (default: all)")
    p.add_argument("--output", help="client: write the logits to this .npy file (its folder must exist and be writable)")
    p.add_argument("--json", action="store_true", help="print this party's report as JSON")
    p.add_argument("--tls", help="folder from `twinfer certs`: present <role>.pem, accept only peers signed by ca.pem")
    add_insecure_arg(p)
    add_transport_args(p)


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        where = " (or the keys in the config file)" if getattr(args, "config", None) else ""
        who = f"--role {args.role}" if args.role else "twinfer party"
        raise ValueError(f"{who} needs {', '.join(missing)}{where}")


def _apply_config(args: argparse.Namespace) -> None:
    """Settings from --config where the command line left the default."""
    parser = argparse.ArgumentParser()
    add_party_args(parser)
    defaults = vars(parser.parse_args([]))
    for key, value in load_party_config(args.config).items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)
    if args.role not in (SERVER, CLIENT, DEALER):
        raise ValueError(f"{args.config}: key 'role' must be server, client or dealer, got {args.role!r}")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"{args.config}: key 'batch' must be at least 1, got {args.batch}")
    if isinstance(args.input_range, (str, list)):
        from twinfer.parties.runtime.model_file import parse_input_range

        text = args.input_range if isinstance(args.input_range, str) else ",".join(map(str, args.input_range))
        try:
            args.input_range = parse_input_range(text)
        except ValueError as err:
            raise ValueError(f"{args.config}: key 'input_range': {err}") from None


def session_id_bits(session_id: str) -> float:
    """The most random bits an id of this length and alphabet can carry (hex: 4 a character,
    base64url: 6, other printable characters: log2(95))."""
    if re.fullmatch(r"[0-9a-fA-F]+", session_id):
        per = 4.0
    elif re.fullmatch(r"[A-Za-z0-9_-]+", session_id):
        per = 6.0
    else:
        per = 6.57
    return per * len(session_id)


def check_session_ids(sessions: list[str], insecure: bool) -> None:
    """A hand-chosen session id admits a party when there is no TLS: refuse one too short to be unguessable."""
    short = [s for s in sessions if session_id_bits(s) < SESSION_ID_BITS]
    if short and not insecure:
        raise ValueError(
            f"--session '{short[0]}' is too short to be unguessable: a session id needs at least {SESSION_ID_BITS} random "
            f"bits (e.g. 32 hex digits: python -c 'import secrets; print(secrets.token_hex(16))'); pass --insecure to use it anyway"
        )


def run(args: argparse.Namespace) -> int:
    if args.config:
        _apply_config(args)
    _require(args, "role", "session")
    if args.role == CLIENT:
        from twinfer.parties.runtime.model_file import check_output_path

        check_output_path(args.output)  # before any party starts, not after the inference
    reports = _run_party(args)
    if args.json:
        for session_id, report in reports.items():
            print(json.dumps(report_json(report, session_id)))
    return 0


def announce(address_file: str | None, role: str, address: str) -> None:
    """Where a listening party can be reached: written to `address_file`, else printed."""
    if address_file:
        tmp = Path(address_file + ".tmp")
        tmp.write_text(address)
        tmp.rename(address_file)  # readers never see a half-written address
    else:
        print(f"{role} listening on {address}", flush=True)


def _run_party(args: argparse.Namespace) -> dict:
    """This party's report for each of its sessions."""
    from twinfer.parties.runtime.host import DealerHost, ServerHost
    from twinfer.parties.runtime.model_file import load_input, load_model
    from twinfer.parties.runtime.session import ClientParty

    spec = session_spec(args)
    if args.role != SERVER:  # the declared input range is the server's
        spec = spec.replace(input_range=None)
    tls = tls_identity(args, args.role)
    sessions = [s.strip() for s in args.session.split(",") if s.strip()]
    if not sessions or len(set(sessions)) != len(sessions):
        raise ValueError(f"--session needs distinct non-empty ids, got '{args.session}'")
    check_session_ids(sessions, args.insecure)

    def config(**kw) -> PartyConfig:
        return PartyConfig(role=args.role, session_id=sessions[0], spec=spec, tls=tls, **kw)

    if args.role == DEALER:
        return _serve(args, DealerHost(config(listen=args.listen), max_sessions=len(sessions)), sessions)
    if not spec.insecure_trusted_first_party:
        _require(args, "dealer")
    if args.role == SERVER:
        _require(args, "model")
        graph, weights = load_model(args.model)
        server = config(listen=args.listen, dealer_address=args.dealer)
        host = ServerHost(graph, weights, server, max_sessions=len(sessions))
        log.info("serving at %s", host.encoding.describe())
        return _serve(args, host, sessions)
    _require(args, "server", "input")
    if len(sessions) > 1:
        raise ValueError("a client runs one session per process; give it one --session id")
    inputs = load_input(args.input)
    samples = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
    party = ClientParty(inputs, args.batch or samples, config(server_address=args.server, dealer_address=args.dealer))
    report = party.run()
    if args.output:
        try:
            np.save(args.output, report.logits)
        except OSError as err:
            raise LocalError(f"cannot write the logits to --output {args.output}: {err}") from None
    return {sessions[0]: report}


def _serve(args: argparse.Namespace, host, sessions: list[str]) -> dict:
    """Serve every session on the host's one listener; their reports, or the first failure."""
    results: dict = {}
    try:
        for session_id in sessions:
            host.open(session_id)
        announce(args.address_file, args.role, host.address)
        results = host.wait(SERVE_TIMEOUT_S)
    finally:
        failed = not results or any(not isinstance(r, PartyReport) for r in results.values())
        host.close(grace_s=0.2 if failed else 1.0)  # after a failure, a silent peer's calls are not waited for
    for outcome in results.values():
        if not isinstance(outcome, PartyReport):
            raise outcome
    return results
