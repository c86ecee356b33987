"""The `twinfer` command: one module per subcommand, numbered exit codes."""

from __future__ import annotations

import argparse
import logging
import sys

from twinfer.parties.errors import BusyError, InputError, LocalError, ModelError, PeerError, ProtocolError, TwinferError

from . import cmd_bench, cmd_certs, cmd_dealer, cmd_demo, cmd_infer, cmd_optimize, cmd_party, cmd_query, cmd_serve, cmd_train_dp

# Exit codes, so scripts can tell failures apart.
EXIT_OK = 0
EXIT_FAILURE = 1  # anything not listed below
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_MODEL = 3  # model missing, malformed or unsupported
EXIT_INPUT = 4  # input missing or not fitting the model
EXIT_PEER = 5  # a peer unreachable, failed, or too slow
EXIT_PROTOCOL = 6  # a message from another session, out of order, or too large; a reused session id
EXIT_LOCAL = 7  # this machine cannot listen where asked, or cannot write the output
EXIT_BUSY = 8  # a standing server or dealer runs all the sessions it may (or is shutting down): try later

EXIT_CODES_HELP = """exit codes:
  0  success
  1  other failure
  2  bad command line
  3  model missing, malformed or unsupported
  4  input missing or not fitting the model
  5  a peer unreachable, failed, or past its deadline
  6  protocol error: wrong or reused session id, unexpected message, frame too large
  7  local failure: cannot listen on the address (in use, not this machine's), cannot write --output
  8  busy: the standing server (or dealer) runs --max-sessions sessions, or is shutting down; try again later
"""


def exit_code(err: BaseException) -> int:
    pairs = ((BusyError, EXIT_BUSY), (ModelError, EXIT_MODEL), (InputError, EXIT_INPUT), (PeerError, EXIT_PEER), (ProtocolError, EXIT_PROTOCOL), (LocalError, EXIT_LOCAL))
    for cls, code in pairs:
        if isinstance(err, cls):
            return code
    return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinfer",
        description="Two-party private neural-network inference.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each party does")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (cmd_infer, cmd_party, cmd_serve, cmd_dealer, cmd_query, cmd_demo, cmd_bench, cmd_certs, cmd_optimize, cmd_train_dp):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except TwinferError as err:
        print(f"twinfer: error {err}", file=sys.stderr)
        return exit_code(err)
    except ValueError as err:  # configuration the parties reject before starting
        print(f"twinfer: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("twinfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
