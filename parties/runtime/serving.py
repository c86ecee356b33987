"""Sessions on demand: the Open call a client makes to a standing server, and what a session leaves behind.

A standing server (`twinfer serve`) answers Open with a session made for the caller: a fresh
128-bit id and the port of the worker that will serve it. The client then runs an ordinary
session (ClientParty) against that worker under that id; the dealer learns the id from the two
parties (the OnDemand policy, parties/dealer/core.py). The id admits one client, once. This module holds the
wire side of that call, both ends, and `SessionEnd`, the record every finished session leaves
for metrics and the log; what picks a worker is the service's (twinfer.deploy.serve).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import grpc

from twinfer.protocols.roles import CLIENT, SERVER

from twinfer.parties.errors import BusyError, PeerError, PeerTimeoutError, TwinferError
from twinfer.parties.proto import twinfer_pb2 as pb
from twinfer.parties.runtime.session import PartyReport
from twinfer.parties.wire.tls import TlsIdentity, check_peer_role
from twinfer.parties.wire.transport import TransportOptions, open_channel

log = logging.getLogger(__name__)

OPEN_METHOD = "/twinfer.Serve/Open"


@dataclass(frozen=True)
class Ticket:
    """What Open hands a client: its session id and the worker's port (on the host it dialed)."""

    session_id: str
    port: int


class Draining(BusyError):
    """The server is shutting down: it finishes running sessions and opens no new one."""


@dataclass
class SessionEnd:
    """One finished session as a party saw it: the metrics' input and the JSON log line."""

    session: str
    role: str
    outcome: str  # "ok", or the error's kind
    latency_s: float  # from the session's opening to its end
    inference_s: float = 0.0  # the batches' own time (PartyReport.batch_latency_s)
    samples: int = 0
    rounds: int = 0
    bytes_online: int = 0
    bytes_offline: int = 0
    peer: str | None = None
    error_id: str | None = None
    error: str | None = None
    fraction_bits: int | None = None  # the session's fixed point and the error its server stated
    stated_error: float | None = None
    exact_truncations: int | None = None

    @classmethod
    def of(cls, session_id: str, role: str, outcome: PartyReport | BaseException, started: float, peer: str | None) -> SessionEnd:
        """The record of a session that began at `started` (time.monotonic) and ended with `outcome`."""
        end = cls(session=session_id, role=role, outcome="ok", latency_s=time.monotonic() - started, peer=peer)
        if isinstance(outcome, PartyReport):
            end.inference_s = float(sum(outcome.batch_latency_s))
            end.samples = int(sum(outcome.batch_sizes))
            end.rounds = int(sum(outcome.batch_rounds))
            end.bytes_online = int(sum(outcome.batch_bytes_online))
            end.bytes_offline = int(outcome.bytes_offline)
            if outcome.encoding is not None:
                end.fraction_bits = outcome.encoding["fraction_bits"]
                end.stated_error = outcome.encoding["stated_error"]
                end.exact_truncations = outcome.encoding["exact_truncations"]
        else:
            end.outcome = outcome.kind if isinstance(outcome, TwinferError) else "error"
            end.error_id = getattr(outcome, "error_id", None)
            end.error = str(getattr(outcome, "message", outcome))
        return end

    def to_json(self) -> str:
        return json.dumps({"event": "session_end", **asdict(self)}, sort_keys=False)


class FrontDoor:
    """The Serve service: Open asks `open_session` for a ticket; a refusal becomes a gRPC status.

    Under mutual TLS only a certificate naming the client role may open a session.
    """

    def __init__(self, open_session: Callable[[str], Ticket], check_role_certs: bool = False) -> None:
        self.open_session = open_session  # given the caller's address
        self.check_role_certs = check_role_certs

    def Open(self, request: pb.OpenRequest, context: grpc.ServicerContext) -> pb.OpenReply:  # noqa: N802
        if self.check_role_certs:
            refused = check_peer_role(context, (CLIENT,), SERVER)
            if refused is not None:
                log.warning("%s", refused)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, refused)
        try:
            ticket = self.open_session(context.peer())
        except Draining as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, err.message)
        except BusyError as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, err.message)
        except TwinferError as err:
            context.abort(grpc.StatusCode.INTERNAL, f"{err.message} [error {err.error_id}]")
        return pb.OpenReply(session_id=ticket.session_id, port=ticket.port)


def add_front_door(servicer: FrontDoor, server: grpc.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.Open, request_deserializer=pb.OpenRequest.FromString, response_serializer=pb.OpenReply.SerializeToString
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("twinfer.Serve", {"Open": handler}),))


class SessionOpener:
    """The client's link to a standing server's front door, kept for several sessions."""

    def __init__(self, address: str, *, options: TransportOptions, tls: TlsIdentity | None = None) -> None:
        self.address = address
        self.options = options
        self._channel = open_channel(address, role=CLIENT, peer_role=SERVER, options=options, tls=tls)
        self._open = self._channel.unary_unary(
            OPEN_METHOD, request_serializer=pb.OpenRequest.SerializeToString, response_deserializer=pb.OpenReply.FromString
        )

    def open(self) -> Ticket:
        """A new session on the server; BusyError if it runs all it may (or is draining)."""
        try:
            reply = self._open(pb.OpenRequest(), timeout=self.options.connect_timeout_s)
        except grpc.RpcError as err:
            code, detail = err.code(), err.details() or err.code().name
            if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE) and "busy" in detail:
                raise BusyError(detail, origin=SERVER) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise PeerTimeoutError(
                    f"the server at {self.address} did not open a session within {self.options.connect_timeout_s:g} s",
                    origin=SERVER,
                ) from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise PeerError(
                    f"{self.address} is not a standing server (`twinfer serve`): it has no Open call; a `twinfer party "
                    "--role server` takes pre-agreed --session ids instead",
                    origin=SERVER,
                ) from None
            raise PeerError(f"the server at {self.address} could not open a session: {detail}", origin=SERVER) from None
        return Ticket(reply.session_id, int(reply.port))

    def close(self) -> None:
        self._channel.close()
