"""Run one twinfer session as three local processes (no Ray) and return every party's report."""

from __future__ import annotations

import multiprocessing as mp
import queue
import uuid

import numpy as np
import torch

from twinfer.parties.errors import PeerTimeoutError, TwinferError
from twinfer.parties.session import PartyConfig, PartyReport
from twinfer.parties.transport import TransportOptions


def _failure(role: str, err: BaseException) -> TwinferError:
    """What a party process hands back instead of its report: a picklable error."""
    if isinstance(err, TwinferError):
        return err
    return TwinferError(f"{role} process failed: {type(err).__name__}: {err}", origin=role)


def _party(role: str, config: PartyConfig, onnx_bytes: bytes, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    try:
        from twinfer.parties.model_file import parse_model
        from twinfer.parties.session import DealerParty, ServerParty

        if role == "dealer":
            party = DealerParty(config)
        else:
            graph, weights = parse_model(onnx_bytes)
            party = ServerParty(graph, weights, config)
        out.put((role, party.address))
        out.put((role, party.run()))
    except BaseException as err:  # the driver must hear of it, not wait for a report
        out.put((role, _failure(role, err)))


def _client(config: PartyConfig, inputs: np.ndarray, batch: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    try:
        from twinfer.parties.session import ClientParty

        out.put(("client", ClientParty(inputs, batch, config).run()))
    except BaseException as err:
        out.put(("client", _failure("client", err)))


def _take(out: mp.Queue, timeout_s: float, procs: list) -> tuple[str, object]:
    """The next message of a party process; a party's failure ends the session for all."""
    try:
        role, value = out.get(timeout=timeout_s)
    except queue.Empty:
        _stop(procs)
        raise PeerTimeoutError(f"no word from the party processes within {timeout_s:g} s") from None
    if isinstance(value, BaseException):
        _stop(procs)
        raise value
    return role, value


def _stop(procs: list) -> None:
    for p in procs:
        p.join(timeout=2 if p.is_alive() else 0)
        if p.is_alive():
            p.kill()
            p.join(timeout=10)


def run_local_session(
    onnx_bytes: bytes,
    inputs: np.ndarray,
    batch: int,
    *,
    options: TransportOptions | None = None,
    prefetch: bool = True,
    timeout_s: float = 900.0,
) -> dict[str, PartyReport]:
    """Dealer, server and client in three spawned processes on loopback; reports by role."""
    options = options or TransportOptions()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    session = uuid.uuid4().hex[:12]

    def config(role: str, **kw) -> PartyConfig:
        return PartyConfig(role=role, session_id=session, options=options, dealer_prefetch=prefetch, **kw)

    procs = []
    dealer = ctx.Process(target=_party, args=("dealer", config("dealer"), onnx_bytes, out))
    dealer.start()
    procs.append(dealer)
    _, dealer_address = _take(out, 120, procs)
    server = ctx.Process(target=_party, args=("server", config("server", dealer_address=dealer_address), onnx_bytes, out))
    server.start()
    procs.append(server)
    _, server_address = _take(out, 120, procs)
    client_config = config("client", server_address=server_address, dealer_address=dealer_address)
    client = ctx.Process(target=_client, args=(client_config, inputs, batch, out))
    client.start()
    procs.append(client)
    reports = dict(_take(out, timeout_s, procs) for _ in range(3))
    for p in (client, server, dealer):
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    return reports
