"""The dealer's gRPC face: each call checks the caller, hands the request to the core, frames the
correlations it returns, and turns the core's refusals (DealerError) into status codes.

The work is in parties/dealer/core.py; nothing here decides anything about a session.
"""

from __future__ import annotations

import functools
import logging

import grpc

from twinfer.protocols.roles import DEALER

from twinfer.parties.dealer.core import DealerCore, DealerError
from twinfer.parties.errors import TwinferError, error_from_wire
from twinfer.parties.proto import twinfer_pb2 as pb
from twinfer.parties.wire.framing import correlation_to_frames
from twinfer.parties.wire.tls import check_peer_role, peer_cert_digest

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024

STATUS = {
    DealerError.UNKNOWN: grpc.StatusCode.NOT_FOUND,
    DealerError.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    DealerError.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    DealerError.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    DealerError.SPENT: grpc.StatusCode.FAILED_PRECONDITION,
    DealerError.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DealerError.ENDED: grpc.StatusCode.ABORTED,
}


def _abort(context: grpc.ServicerContext, err: DealerError):
    context.abort(STATUS[err.reason], str(err))


def _caller(core: DealerCore, context: grpc.ServicerContext, role: str) -> str | None:
    """Under mutual TLS: the caller's certificate must name the role it asks as; its digest is its identity."""
    if not core.bind_roles:
        return None
    refused = check_peer_role(context, (role,), DEALER)
    if refused is not None:
        log.warning("%s", refused)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"dealer: {refused}")
    return peer_cert_digest(context)


def failure_from_wire(error: pb.Error) -> TwinferError:
    """The failure a party reports on closing, as its own party and its peer name it (its kind, id and origin)."""
    prefix = f"{error.origin or 'peer'} failed ({error.kind}): "
    return error_from_wire(error.kind, error.message.removeprefix(prefix), error.error_id, error.origin)


def _seed(core: DealerCore, request: pb.SeedRequest, context: grpc.ServicerContext) -> pb.SeedReply:
    caller = _caller(core, context, request.role)
    try:
        seed, key = core.seed(request.session_id, request.role, request.protocol, caller)
    except DealerError as err:
        _abort(context, err)
    return pb.SeedReply(seed=seed, key=key)


def _frames(core: DealerCore, request: pb.TupleRequest, role: str, caller: str | None) -> list[bytes]:
    arrays = core.correlation(request.session_id, role, request.function, request.args_json, request.index, caller)
    return correlation_to_frames(request.index, arrays, CHUNK_BYTES)


def _tuple(core: DealerCore, request: pb.TupleRequest, context: grpc.ServicerContext):
    caller = _caller(core, context, request.role)
    try:
        frames = _frames(core, request, request.role, caller)
    except DealerError as err:
        _abort(context, err)
    yield from frames


def _prefetch(core: DealerCore, request: pb.PrefetchRequest, context: grpc.ServicerContext):
    """Correlations asked for ahead of use; with none, a keepalive."""
    caller = _caller(core, context, request.role)
    if not request.tuples:
        if context.is_active():  # a keepalive its party gave up on says nothing about that party
            try:
                core.keepalive(request.session_id, request.role, caller)
            except DealerError as err:
                _abort(context, err)
        return
    for i, tuple_request in enumerate(request.tuples):
        if not context.is_active():
            return  # the party went away: stop making tuples
        try:
            frames = _frames(core, tuple_request, request.role, caller)
        except DealerError as err:
            if i and err.reason == DealerError.ENDED:
                return  # the session failed meanwhile: what is left is not needed
            _abort(context, err)
        yield from frames


def _close(core: DealerCore, request: pb.CloseRequest, context: grpc.ServicerContext) -> pb.CloseReply:
    caller = _caller(core, context, request.role)
    error = failure_from_wire(request.error) if request.HasField("error") else None
    try:
        core.close(request.session_id, request.role, error, caller)
    except DealerError as err:
        _abort(context, err)
    return pb.CloseReply()


def add_dealer_servicer(core: DealerCore, server: grpc.Server) -> None:
    """Serve `core` as the Dealer service on `server`; tuple replies use twinfer's framing (parties/wire/framing.py)."""
    call = functools.partial
    handlers = {
        "Seed": grpc.unary_unary_rpc_method_handler(
            call(_seed, core), request_deserializer=pb.SeedRequest.FromString, response_serializer=pb.SeedReply.SerializeToString
        ),
        "Tuple": grpc.unary_stream_rpc_method_handler(call(_tuple, core), request_deserializer=pb.TupleRequest.FromString),
        "Prefetch": grpc.unary_stream_rpc_method_handler(call(_prefetch, core), request_deserializer=pb.PrefetchRequest.FromString),
        "Close": grpc.unary_unary_rpc_method_handler(
            call(_close, core), request_deserializer=pb.CloseRequest.FromString, response_serializer=pb.CloseReply.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("twinfer.Dealer", handlers),))
