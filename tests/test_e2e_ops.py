"""Clip (ReLU6) and Concat end to end: real dealer, server and client processes over gRPC,
the private logits against PyTorch's, and the measured counters against the cost model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from twinfer.deploy.launch.local import run_local_session
from twinfer.parties.wire.transport import TransportOptions
from twinfer.protocols.cost_model import graph_cost, total_cost
from twinfer.protocols.ir.onnx_export import export_onnx
from twinfer.protocols.ir.onnx_import import graph_from_onnx

pytestmark = pytest.mark.timeout(300)


class Branches(nn.Module):
    """Two branches joined by Concat (Inception style), each with ReLU6 (MobileNet style)."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(1, 3, 3, padding=1)
        self.right = nn.Conv2d(1, 2, 1)
        self.head = nn.Linear(5 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([nn.functional.relu6(self.left(x)), torch.relu(self.right(x))], dim=1)
        return self.head(nn.functional.avg_pool2d(nn.functional.relu6(joined * 1.0), 2).flatten(1))


def test_clip_and_concat_private_equals_pytorch():
    torch.manual_seed(3)
    model = Branches().eval()
    x = torch.randn(3, 1, 8, 8) * 4  # wide enough that both bounds of ReLU6 are crossed
    onnx_bytes = export_onnx(model, x[:1])
    graph, _ = graph_from_onnx(onnx.load_from_string(onnx_bytes))
    ops = [n.op for n in graph.nodes]
    assert ops.count("Clip") == 2 and "Concat" in ops
    with torch.no_grad():
        expected = model(x).numpy()
        left = model.left(x)
    assert (left > 6).any() and (left < 0).any()
    reports = run_local_session(onnx_bytes, x.numpy(), batch=3, options=TransportOptions(connect_timeout_s=60.0), timeout_s=240)
    client = reports["client"]
    np.testing.assert_allclose(client.logits, expected, atol=2e-2)
    predicted = total_cost(graph_cost(graph, batch=3))
    for role in ("client", "server"):
        assert reports[role].comparisons == predicted.comparisons  # 2 per ReLU6 element, 1 per ReLU
        assert reports[role].relu_count == predicted.relu_count == 3 * 2 * 8 * 8
        assert reports[role].batch_bytes_online[0] == predicted.bytes_online
    assert predicted.comparisons == 3 * (2 * 3 * 8 * 8 + 2 * 8 * 8 + 2 * 5 * 8 * 8)
