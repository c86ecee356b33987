"""Options several subcommands share, and how a parsed command line becomes launcher settings."""

from __future__ import annotations

import argparse


from twinfer.protocols.backends import DEFAULT_PROTOCOL, protocols
from twinfer.protocols.backends.base import AUTO, DEFAULT_FRACTION_BITS, FRACTION_BITS_RANGE, check_session_bits
from twinfer.protocols.passes.encoding import TRUNCATION_POLICIES
from twinfer.parties.wire.network_profile import parse_profile
from twinfer.parties.runtime.session import CLIENT, DEALER, SERVER, ClientInputs
from twinfer.parties.runtime.session_spec import SessionSpec
from twinfer.parties.wire.transport import TransportOptions

from ..launch.inference import InferenceResult, ModelLike, private_inference
from ..launch.ray_launcher import RayOptions


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (so --batch 0 or -1 is a usage error at once)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction_bits(text: str) -> int | str:
    """An argparse type: --fraction-bits auto or an integer in range."""
    try:
        return check_session_bits(text if text == AUTO else int(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace("fraction bits", "--fraction-bits")) from None


def input_range_arg(text: str) -> tuple[float, float]:
    """An argparse type: --input-range LO,HI."""
    from twinfer.parties.runtime.model_file import parse_input_range

    try:
        return parse_input_range(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_input_range_arg(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument(
        "--input-range", type=input_range_arg, default=None, metavar="LO,HI",
        help=f"{who}the values the model is declared for (else an artifact's calibration range): inputs outside it "
        "are refused, and the server checks the fixed-point encoding against what such inputs can reach in every layer",
    )  # fmt: skip


def add_insecure_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--insecure", action="store_true",
        help="INSECURE, an explicit choice: listen on a non-loopback address without --tls, and accept a hand-chosen "
        "--session id shorter than 128 bits. Anyone who reaches the port and guesses the id can then join the session",
    )  # fmt: skip


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
        help="the secure backend: fss-compact (the default: two-round ReLUs from compact dealer keys, weights opened "
        "once), fss (one-round ReLUs from keys about twice the size: a little faster where rounds are slow) or crypten "
        "(CrypTen's protocols; the one with --insecure-trusted-first-party); every party of a session must use the same",
    )
    lo, hi = FRACTION_BITS_RANGE
    parser.add_argument(
        "--fraction-bits", type=fraction_bits, default=AUTO,
        help=f"fixed point: fractional bits of every shared value, 'auto' (the default: the largest up to "
        f"{DEFAULT_FRACTION_BITS} that holds every value within the error target, chosen by the server's check; a client "
        f"takes the server's) or {lo}-{hi}; fewer hold larger values (products must stay below 2^(63-2f)) at a coarser "
        "last place 2^-f",
    )  # fmt: skip
    parser.add_argument(
        "--truncation", default="auto", choices=TRUNCATION_POLICIES,
        help="server: how products are scaled back: 'auto' (the default: exact, from the dealer's keys, in the layers "
        "where the free local truncation's risk of a wrong answer is worth a round; none on fss where a ReLU follows), "
        "'local' (free; wrong with probability |y|/2^64 per value) or 'exact' (every layer)",
    )  # fmt: skip
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


def session_spec(args: argparse.Namespace) -> SessionSpec:
    """The session's settings from a parsed command line: built here once, handed whole to the parties
    (a ValueError names a setting that is wrong)."""
    return SessionSpec(
        protocol=args.protocol,
        fraction_bits=args.fraction_bits,
        truncation=args.truncation,
        input_range=getattr(args, "input_range", None),
        options=transport_options(args),
        insecure=getattr(args, "insecure", False),
        insecure_trusted_first_party=getattr(args, "insecure_trusted_first_party", False),
    )


def run_private_inference(args, model: ModelLike, inputs: ClientInputs) -> InferenceResult:
    """private_inference with the options of a parsed command line (infer, demo)."""
    return private_inference(
        model,
        inputs,
        session_spec(args),
        batch_size=args.batch,
        ray_options=ray_options_from_args(args),
        tls_dir=getattr(args, "tls", None),
        progress=not args.json,
    )


def add_standing_args(parser: argparse.ArgumentParser, role: str, default_listen: str) -> None:
    """Options of a party that keeps running (`twinfer serve`, `twinfer dealer`)."""
    parser.add_argument("--listen", default=default_listen, help=f"address to listen on (default {default_listen}; port 0 picks one)")
    parser.add_argument("--address-file", help="write the bound address here once listening (else it is printed)")
    parser.add_argument("--tls", help=f"folder from `twinfer certs`: present {role}.pem, accept only peers signed by ca.pem")
    parser.add_argument(
        "--metrics-port", type=int, default=None,
        help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics (0 picks a port, printed at start)",
    )  # fmt: skip
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics page (default 127.0.0.1)")
    parser.add_argument(
        "--drain-timeout", type=float, default=30.0,
        help="on SIGTERM: stop accepting, let running sessions finish for this long (seconds, default 30), then exit 0",
    )  # fmt: skip
    add_transport_args(parser)


def tls_identity(args: argparse.Namespace, role: str) -> "TlsIdentity | None":  # noqa: F821 - imported below
    """The TlsIdentity of `role` from --tls DIR (or a config file's explicit ca/cert/key), or None."""
    from twinfer.parties.wire.tls import TlsIdentity

    if not args.tls:
        return None
    if isinstance(args.tls, dict):  # from a config file: explicit files
        return TlsIdentity.from_files(role, args.tls["ca"], args.tls["cert"], args.tls["key"])
    return TlsIdentity.from_dir(args.tls, role)


def refuse_trusted_first_party(args: argparse.Namespace, command: str) -> None:
    """A standing server's sessions always have a dealer: the development-only TFP flag is refused, not ignored."""
    if getattr(args, "insecure_trusted_first_party", False):
        raise ValueError(f"twinfer {command} always uses a dealer (`twinfer dealer`); --insecure-trusted-first-party is for `twinfer party`")
