"""Comparison widths from calibration ranges (protocols/passes/ranges.py) and how an artifact carries them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twinfer.protocols.artifact import ArtifactError, apply_comparison_bits
from twinfer.protocols.ir.graph import Graph, Node
from twinfer.protocols.passes.plain import annotate_shapes
from twinfer.protocols.passes.ranges import comparison_ranges, comparison_widths, width_for
from twinfer.protocols.passes.validation import graph_from_json, validate_graph


def _graph(padding=(0, 0)) -> tuple[Graph, dict[str, np.ndarray]]:
    nodes = [
        Node("fc", "Gemm", ("x",), "h", ("w",)),
        Node("relu", "Relu", ("h",), "r"),
        Node("cap", "Clip", ("r",), "c", (), {"min": 0.0, "max": 6.0}),
        Node("shape", "Reshape", ("c",), "s", (), {"shape": [0, 1, 2, 2]}),
        Node("pool", "MaxPool", ("s",), "y", (), {"kernel": [2, 2], "stride": [2, 2], "padding": list(padding)}),
    ]
    weights = {"w": np.eye(4, dtype=np.float32) * 3}
    graph = Graph("x", (4,), "y", nodes, {"w": (4, 4)})
    validate_graph(graph)
    annotate_shapes(graph, weights)
    return graph, weights


def test_width_holds_margin_times_the_peak_and_no_more():
    for peak in (0.01, 1.0, 3.5, 1000.0):
        n = width_for(peak, 4.0)
        assert 4 * peak * 2**16 < 2 ** (n - 1) <= 2 * 4 * peak * 2**16  # the smallest that holds it
    assert width_for(1e30, 4.0) == 64 and width_for(0.0, 4.0) >= 2


def test_ranges_follow_what_each_comparison_sees():
    graph, weights = _graph()
    x = np.array([[1.0, -2.0, 0.5, 1.5]], np.float32)  # fc: x * 3 = (3, -6, 1.5, 4.5)
    ranges = comparison_ranges(graph, weights, x)
    assert ranges["relu"] == pytest.approx(6.0)  # ReLU: its input
    assert ranges["cap"] == pytest.approx(6.0)  # Clip: its differences to the bounds, r - 0 and r - 6 (r = 0 gives -6)
    assert ranges["pool"] == pytest.approx(2 * 4.5)  # max-pool: differences of window values
    widths = comparison_widths(graph, weights, x, margin=4.0)
    assert widths == {"relu": width_for(6.0, 4), "cap": width_for(6.0, 4), "pool": width_for(9.0, 4)}
    padded, w = _graph(padding=(1, 1))
    assert comparison_widths(padded, w, x)["pool"] == 64  # compared against its padding value


def test_an_artifact_width_reaches_the_graph_and_its_json_and_bad_ones_are_refused():
    graph, _ = _graph()
    apply_comparison_bits(graph, {"relu": 20, "pool": 24})
    back = graph_from_json(graph.to_json())
    assert {n.name: n.attrs.get("bits") for n in back.nodes if n.op in ("Relu", "MaxPool")} == {"relu": 20, "pool": 24}
    with pytest.raises(ArtifactError, match="'fc', which is not a comparison"):
        apply_comparison_bits(_graph()[0], {"fc": 20})
    with pytest.raises(ArtifactError, match="bits=99"):
        apply_comparison_bits(_graph()[0], {"relu": 99})


def test_fss_at_the_calibrated_width_equals_plaintext():
    from tests.test_backends import run_two_party

    graph, weights = _graph()
    x = torch.tensor([[1.0, -2.0, 0.5, 1.5], [0.2, 0.3, -0.1, 1.9]])
    apply_comparison_bits(graph, comparison_widths(graph, weights, x.numpy()))
    y, counts, _, offline = run_two_party("fss", graph, weights, x)
    from twinfer.protocols.passes.plain import run_plain

    expected = run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, x)
    assert torch.max(torch.abs(y - expected)) < 0.01
    full, _ = _graph()
    *_, full_offline = run_two_party("fss", full, weights, x)
    assert offline < 0.6 * full_offline  # narrower keys: the dealer sends well under the 64-bit keys' bytes
