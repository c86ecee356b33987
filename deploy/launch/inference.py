"""`private_inference`: validate, launch the three parties on Ray, and assemble the result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dataclasses

from twinfer.protocols.passes.encoding import EncodingReport, SessionEncoding
from twinfer.protocols.ir.graph import Graph
from twinfer.protocols.passes.public_inputs import check_covered, split_inputs
from twinfer.parties.errors import InputError
from twinfer.parties.wire.network_profile import NetworkProfile, parse_profile
from twinfer.parties.wire.transport import TransportOptions
from twinfer.protocols.backends import DEFAULT_PROTOCOL
from twinfer.protocols.backends.base import AUTO
from twinfer.parties.runtime.model_file import (
    check_input_array,
    check_input_fits,
    check_inputs_encode,
    parse_model,
    read_model_bytes,
)
from twinfer.parties.runtime.session import CLIENT, DEALER, SERVER, ClientInputs, PartyReport
from twinfer.parties.runtime.session_spec import SessionSpec
from twinfer.parties.wire.tls import TlsIdentity
from twinfer.protocols.passes.onnx_export import export_onnx

from .ray_launcher import RayOptions, run_parties

ModelLike = str | Path | bytes | torch.nn.Module


@dataclass
class InferenceResult:
    """The client's logits and every party's metrics for one session."""

    logits: np.ndarray
    reports: dict[str, PartyReport]
    batch_size: int
    relu_per_sample: int
    network: NetworkProfile | None = None
    encoding: EncodingReport | None = None  # the range check of these inputs before the run

    @property
    def client(self) -> PartyReport:
        return self.reports[CLIENT]

    def summary(self) -> dict[str, Any]:
        c = self.client
        offline = sum(r.bytes_offline for role, r in self.reports.items() if role in (SERVER, CLIENT))
        return {
            "n_samples": int(len(self.logits)),
            "batch_size": self.batch_size,
            "batches": len(c.batch_latency_s),
            "latency_s": float(sum(c.batch_latency_s)),
            "latency_per_batch_s": float(np.mean(c.batch_latency_s)),
            "setup_s": float(c.setup_s),
            "rounds": int(sum(c.batch_rounds)),
            "rounds_per_batch": int(max(c.batch_rounds)),
            "bytes_online": int(sum(c.batch_bytes_online)),
            "bytes_offline": int(offline),
            "relu_count": int(c.relu_count),
            "relu_per_sample": self.relu_per_sample,
            "comparisons": int(c.comparisons),
            "protocol": c.protocol,
            "latency_per_batch_list_s": [float(t) for t in c.batch_latency_s],
            "public_inputs": list(c.public_inputs),
        } | self._encoding() | self._bound()

    def _encoding(self) -> dict[str, Any]:
        """The fixed point the run used, as the server told the client: the error it states, each
        layer's truncation, the inputs it holds (SessionEncoding.summary)."""
        return dict(self.client.encoding or {})

    def _bound(self) -> dict[str, Any]:
        """Measured latency of the last batch against the network's lower bound."""
        if self.network is None:
            return {}
        c = self.client
        sent, total = c.batch_bytes_sent[-1], c.batch_bytes_online[-1]
        bound = self.network.lower_bound_s(c.batch_rounds[-1], max(sent, total - sent))
        latency = c.batch_latency_s[-1]
        return {
            "network": self.network.describe(),
            "lower_bound_s": bound,
            "last_batch_latency_s": latency,
            "latency_over_lower_bound": latency / bound if bound > 0 else None,
        }

    def to_json_dict(self) -> dict[str, Any]:
        out = self.summary()
        out["logits"] = self.logits.tolist()
        out["parties"] = [{"role": r.role, "pid": r.pid, "node": r.node} for r in self.reports.values()]
        out["layers"] = self.client.layers
        return out


def model_bytes(model: ModelLike, sample_shape: tuple[int, ...]) -> bytes:
    """ONNX bytes for a path, raw bytes, or a torch module (exported with the TorchScript exporter)."""
    if isinstance(model, torch.nn.Module):
        return export_onnx(model, torch.zeros((1, *sample_shape)))
    if isinstance(model, bytes):
        return model
    return read_model_bytes(model)


def private_inference(
    model: ModelLike,
    inputs: ClientInputs,
    spec: SessionSpec | None = None,
    *,
    batch_size: int | None = None,
    ray_options: RayOptions | None = None,
    tls_dir: str | Path | None = None,
    progress: bool = False,
) -> InferenceResult:
    """Run the model privately on `inputs`: the server holds the model, the client the inputs (an
    array, or one per model input by name: the secret one and public ones such as an attention mask).

    `spec`: the session's settings (protocol, fixed point, truncation, declared input range,
    transport; SessionSpec's defaults without). `tls_dir`: a folder from `twinfer certs`; every link
    then runs over mutual TLS. Before any party starts, the inputs are checked (real numbers, the
    model's shape and declared input range) and so is what they do in every layer against the
    encoding (protocols/passes/encoding.py), the error stated from a simulation of the fixed point
    on them: an InputError naming the layer, never a wrong answer. The server adopts that encoding.
    """
    spec = spec or SessionSpec()
    named = {k: check_input_array(v, f"input '{k}'") for k, v in inputs.items()} if isinstance(inputs, Mapping) else {"": check_input_array(inputs)}
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    first = next(iter(named.values()))
    data = model_bytes(model, tuple(first.shape[1:]) if first.ndim > 1 else (1,))
    graph, weights = parse_model(data, source=str(model) if isinstance(model, (str, Path)) else "model")
    x, public = public_values(graph, named)
    report, encoding = check_session(graph, weights, x, spec, public)
    batch = batch_size or len(x)
    tls = tls_identities(tls_dir) if tls_dir is not None else None
    reports = run_parties(
        data,
        named if public else x,
        batch_size=batch,
        spec=spec.replace(fraction_bits=encoding.fraction_bits),
        ray_options=ray_options,
        tls=tls,
        progress=progress,
        encoding=encoding,
    )
    return InferenceResult(
        logits=reports[CLIENT].logits,
        reports=reports,
        batch_size=batch,
        relu_per_sample=graph.relu_count(),
        network=spec.options.network,
        encoding=report,
    )


def infer(
    model: ModelLike,
    inputs: ClientInputs,
    *,
    protocol: str | None = None,
    fraction_bits: int | str = AUTO,
    truncation: str = "auto",
    input_range: tuple[float, float] | None = None,
    network: str | None = None,
    timeout_s: float = 60.0,
    batch_size: int | None = None,
    tls_dir: str | Path | None = None,
    ray_address: str | None = None,
    insecure: bool = False,
    progress: bool = False,
) -> InferenceResult:
    """`twinfer.infer`: the model run privately on `inputs` by a server, a client and a dealer
    (Ray: an embedded local instance, or the cluster at `ray_address`, where parties listen on
    their nodes' addresses: give `tls_dir`, or `insecure=True` to accept plaintext). The inputs
    are checked against the model and its fixed point before any party starts. The settings are
    `twinfer infer`'s options; the session's SessionSpec is built from them here.

        result = twinfer.infer("model.onnx", images, protocol="fss", network="wan")
        result.logits, result.summary()
    """
    spec = SessionSpec(
        protocol=protocol or DEFAULT_PROTOCOL,
        fraction_bits=fraction_bits,
        truncation=truncation,
        input_range=input_range,
        options=TransportOptions(recv_timeout_s=timeout_s, network=parse_profile(network) if network else None),
        insecure=insecure,
    )
    return private_inference(
        model, inputs, spec, batch_size=batch_size, ray_options=RayOptions(address=ray_address), tls_dir=tls_dir, progress=progress
    )


def public_values(graph: Graph, named: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """The secret input of `named` (one array per model input; '' for a lone one) and the values the
    model's public program makes of the public ones (None without); an InputError naming the problem."""
    try:
        x, public = split_inputs(graph.input_name, graph.public_inputs, named)
        if not public:
            return x, None
        values = graph.public_program.run(public)
        check_covered(graph.public, values)
    except ValueError as err:
        raise InputError(str(err)) from None
    return x, values


def check_session(
    graph: Graph, weights: dict[str, np.ndarray], inputs: np.ndarray, spec: SessionSpec, public: dict[str, np.ndarray] | None = None
) -> tuple[EncodingReport, SessionEncoding]:
    """Where one process holds model and inputs, before any party starts: the inputs against the
    model (shape, finite, declared range) and what they do in every layer at the session's fixed
    point (`public`: their public values, public_values); the encoding the server then adopts (its
    input range: the declared one, else these inputs'). An InputError naming the problem when refused."""
    if spec.input_range is not None:
        graph = dataclasses.replace(graph, input_range=spec.input_range)
    check_input_fits(graph, inputs)
    report = check_inputs_encode(graph, weights, inputs, spec.fraction_bits, spec.protocol, spec.truncation, public)
    held = graph.input_range or (float(np.min(inputs)), float(np.max(inputs)))
    return report, SessionEncoding.of(report, held)


def tls_identities(directory: str | Path) -> dict[str, TlsIdentity]:
    """Every role's TLS identity from a folder `twinfer certs` wrote."""
    return {role: TlsIdentity.from_dir(directory, role) for role in (SERVER, CLIENT, DEALER)}
