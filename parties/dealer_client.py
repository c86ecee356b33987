"""A party's side of the dealer: the seed, tuple requests, and the CrypTen provider using them."""

from __future__ import annotations

import json
import re
import time

import grpc
import numpy as np
import torch

from .crypten_compat import import_crypten
from .errors import PeerError, PeerTimeoutError, TwinferError
from .metrics import Metrics
from .proto import twinfer_pb2 as pb
from .proto import twinfer_pb2_grpc as pb_grpc
from .transport import TransportOptions
from .wire import framed_decoder

crypten = import_crypten()
import crypten.mpc as crypten_mpc  # noqa: E402
from crypten.mpc.provider import ttp_provider  # noqa: E402

PROVIDER_NAME = "TWINFER_DEALER"


def _jsonable(value):
    if isinstance(value, (torch.Size, tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"tuple request argument of type {type(value).__name__} cannot be sent to the dealer")


class DealerClient:
    """Talks to the dealer for one session; party 0 also asks it for tuples."""

    def __init__(
        self,
        address: str,
        *,
        session_id: str,
        role: str,
        options: TransportOptions,
        metrics: Metrics,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.session_id = session_id
        self.role = role
        self.options = options
        self.metrics = metrics
        opts = options.grpc_options()
        self._channel = (
            grpc.insecure_channel(address, options=opts)
            if credentials is None
            else grpc.secure_channel(address, credentials, options=opts)
        )
        try:
            grpc.channel_ready_future(self._channel).result(timeout=options.connect_timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise PeerError(
                f"dealer at {address} is not reachable (no connection within {options.connect_timeout_s:g} s)",
                origin=role,
            ) from None
        self._stub = pb_grpc.DealerStub(self._channel)
        self._tuple = self._channel.unary_stream(
            "/twinfer.Dealer/Tuple",
            request_serializer=pb.TupleRequest.SerializeToString,
            response_deserializer=framed_decoder(pb.TupleReply),
        )
        self._closed = False
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self._call(self._stub.Seed, pb.SeedRequest(session_id=session_id, role=role)).seed)
        metrics.count_offline(8)

    def _error(self, err: grpc.RpcError) -> TwinferError:
        code = err.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return PeerTimeoutError(
                f"dealer did not answer within {self.options.recv_timeout_s:g} s", origin=self.role
            )
        detail = err.details() or f"dealer call failed: {code.name}"
        # A session ended by a party's failure keeps that failure's id ("[error <id>]").
        shared = re.search(r"\[error ([^\]\s]+)\]", detail)
        return PeerError(detail, error_id=shared.group(1) if shared else None, origin="dealer")

    def _call(self, method, request):
        try:
            return method(request, timeout=self.options.recv_timeout_s)
        except grpc.RpcError as err:
            raise self._error(err) from None

    # The two methods CrypTen's TrustedThirdParty calls on its client.

    def get_generator(self, device=None) -> torch.Generator:
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("twinfer's dealer serves CPU tensors only")
        return self.generator

    def ttp_request(self, func_name: str, device, *args, **kwargs) -> torch.Tensor:
        """Fetch party 0's share of one tuple; its size and op are public."""
        request = pb.TupleRequest(
            session_id=self.session_id,
            function=func_name,
            args_json=json.dumps({"args": _jsonable(args), "kwargs": {k: _jsonable(v) for k, v in kwargs.items()}}),
        )
        start = time.perf_counter()
        out: np.ndarray | None = None
        offset = 0
        try:
            for reply in self._tuple(request, timeout=self.options.recv_timeout_s):
                if out is None:
                    out = np.empty(int(np.prod(reply.shape, dtype=np.int64)), dtype=np.int64)
                    raw = out.view(np.uint8)
                if offset + len(reply.data) > raw.size:
                    raise PeerError(f"dealer sent more data than tuple shape {list(reply.shape)} holds", origin="dealer")
                raw[offset : offset + len(reply.data)] = np.frombuffer(reply.data, dtype=np.uint8)
                offset += len(reply.data)
                shape = list(reply.shape)
        except grpc.RpcError as err:
            raise self._error(err) from None
        if out is None or offset != out.nbytes:
            raise PeerError(f"dealer sent an incomplete '{func_name}' tuple", origin="dealer")
        self.metrics.count_offline(offset)
        self.metrics.count_receive(0, time.perf_counter() - start)
        return torch.from_numpy(out.reshape(shape))

    def close(self, error: TwinferError | None = None) -> None:
        """Tell the dealer this party is done (or failed, with the shared error id)."""
        if self._closed:
            return
        self._closed = True
        request = pb.CloseRequest(session_id=self.session_id, role=self.role)
        if error is not None:
            request.error.CopyFrom(
                pb.Error(error_id=error.error_id, kind=error.kind, message=error.message, origin=error.origin or self.role)
            )
        try:
            self._stub.Close(request, timeout=min(5.0, self.options.recv_timeout_s))
        except grpc.RpcError:
            pass  # the dealer may already be gone; closing is best effort
        finally:
            self._channel.close()


class _ActiveDealer:
    """Stands in for CrypTen's TTPClient: returns the DealerClient of the running session."""

    client: DealerClient | None = None

    @staticmethod
    def get() -> DealerClient:
        if _ActiveDealer.client is None:
            raise RuntimeError("no dealer session is active in this party")
        return _ActiveDealer.client

    @staticmethod
    def _init() -> None:
        return None

    @staticmethod
    def uninit() -> None:
        _ActiveDealer.client = None


class DealerProvider(ttp_provider.TrustedThirdParty):
    """CrypTen's TTP tuple math, with the dealer reached over twinfer's gRPC link."""

    NAME = PROVIDER_NAME


def use_dealer(client: DealerClient) -> None:
    """Make CrypTen draw every tuple through `client` (cfg.mpc.provider = TWINFER_DEALER)."""
    providers = getattr(crypten_mpc, "__SUPPORTED_PROVIDERS")
    if PROVIDER_NAME not in providers:
        providers[PROVIDER_NAME] = DealerProvider()
    # TrustedThirdParty looks its client up by this module-level name at call time.
    ttp_provider.TTPClient = _ActiveDealer
    _ActiveDealer.client = client
    crypten.cfg.mpc.provider = PROVIDER_NAME


def use_insecure_trusted_first_party() -> None:
    """CrypTen's TFP: the server makes every tuple itself and could read the client's input."""
    crypten.cfg.mpc.provider = "TFP"
