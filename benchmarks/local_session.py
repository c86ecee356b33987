"""Run one twinfer session as three local processes (no Ray) and return every party's report."""

from __future__ import annotations

import multiprocessing as mp
import uuid

import numpy as np
import torch

from twinfer.parties.session import PartyConfig, PartyReport
from twinfer.parties.transport import TransportOptions


def _party(role: str, config: PartyConfig, onnx_bytes: bytes, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    from twinfer.parties.model_file import parse_model
    from twinfer.parties.session import DealerParty, ServerParty

    if role == "dealer":
        party = DealerParty(config)
    else:
        graph, weights = parse_model(onnx_bytes)
        party = ServerParty(graph, weights, config)
    out.put((role, party.address))
    out.put((role, party.run()))


def _client(config: PartyConfig, inputs: np.ndarray, batch: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    from twinfer.parties.session import ClientParty

    out.put(("client", ClientParty(inputs, batch, config).run()))


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

    dealer = ctx.Process(target=_party, args=("dealer", config("dealer"), onnx_bytes, out))
    dealer.start()
    _, dealer_address = out.get(timeout=120)
    server = ctx.Process(target=_party, args=("server", config("server", dealer_address=dealer_address), onnx_bytes, out))
    server.start()
    _, server_address = out.get(timeout=120)
    client_config = config("client", server_address=server_address, dealer_address=dealer_address)
    client = ctx.Process(target=_client, args=(client_config, inputs, batch, out))
    client.start()
    reports = dict(out.get(timeout=timeout_s) for _ in range(3))
    for p in (client, server, dealer):
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    return reports
