"""ONNX import: supported ops match PyTorch in plaintext; anything else fails early and clearly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from twinfer.parties.errors import InputError, ModelError
from twinfer.parties.runtime.model_file import check_input_fits, load_input, load_model, parse_model
from twinfer.protocols.ir.graph import Graph, GraphError, UnsupportedOpError
from twinfer.protocols.passes.validation import graph_from_json
from twinfer.protocols.passes.onnx_import import graph_from_onnx
from twinfer.protocols.passes.plain import run_plain
from twinfer.protocols.passes.onnx_export import export_onnx


def _compile(model: torch.nn.Module, shape=(1, 28, 28)):
    return graph_from_onnx(onnx.load_from_string(export_onnx(model, torch.zeros(1, *shape))))


def _plain(graph, weights, x):
    return run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, x).detach().numpy()


@pytest.mark.parametrize("name", ["fashion_cnn", "tiny_resnet"])
def test_demo_models_match_pytorch(name, request, fashion_test):
    model = request.getfixturevalue(name)
    graph, weights = _compile(model)
    x = torch.from_numpy(fashion_test[0][:16])
    np.testing.assert_allclose(_plain(graph, weights, x), model(x).detach().numpy(), atol=1e-4)
    assert graph.input_shape == (1, 28, 28)


def test_every_listed_op_imports():
    class AllOps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(4)
            self.bn_after_relu = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4 * 2 * 2, 3)
            self.proj = torch.nn.Parameter(torch.randn(3, 5))
            for bn in (self.bn, self.bn_after_relu):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-0.2, 0.2)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            y = self.bn_after_relu(y) + y  # Add of two activations
            y = torch.nn.functional.max_pool2d(y, 2)
            y = torch.nn.functional.avg_pool2d(y, 2)
            g = torch.nn.functional.adaptive_avg_pool2d(y, 1)
            y = y + g  # broadcast Add
            y = self.fc(torch.flatten(y, 1))
            return y.reshape(-1, 3) @ self.proj  # Reshape with a constant shape, MatMul

    torch.manual_seed(1)
    model = AllOps().eval()
    graph, weights = _compile(model, (2, 8, 8))
    ops = {n.op for n in graph.nodes}
    assert {"Conv", "Gemm", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Affine", "Add", "Flatten"} <= ops
    x = torch.randn(3, 2, 8, 8)
    np.testing.assert_allclose(_plain(graph, weights, x), model(x).detach().numpy(), atol=1e-4)


def test_unknown_ops_are_named_with_their_nodes():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.Sigmoid(), torch.nn.Tanh())
    with pytest.raises(UnsupportedOpError) as info:
        _compile(model)
    message = str(info.value)
    assert "op Sigmoid" in message and "op Tanh" in message
    assert "/2/Sigmoid" in message and "/3/Tanh" in message
    with pytest.raises(ModelError, match="Sigmoid"):
        parse_model(export_onnx(model, torch.zeros(1, 1, 28, 28)))


def test_missing_and_malformed_model_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "absent.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 this is not protobuf \xff\xff")
    with pytest.raises(ModelError, match="bad.onnx"):
        load_model(bad)
    wrong = tmp_path / "weights.pt"
    wrong.write_bytes(b"x")
    with pytest.raises(ModelError, match="must be an ONNX file"):
        load_model(wrong)


def test_asymmetric_padding_is_refused():
    node = onnx.helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], name="pool")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1, 2, 2])],
    )
    with pytest.raises(GraphError, match="asymmetric padding"):
        graph_from_onnx(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def test_graph_json_round_trip_carries_no_weights(fashion_cnn):
    graph, weights = _compile(fashion_cnn)
    text = graph.to_json()
    back = graph_from_json(text)
    assert back.to_json() == text
    assert back.relu_count() == graph.relu_count() == 8 * 14 * 14 + 16 * 7 * 7 + 64  # each ReLU after its max-pool (rewrite.py)
    # Only shapes travel: no weight value appears in the public description.
    assert str(float(next(iter(weights.values())).ravel()[0]))[:8] not in text
    with pytest.raises(GraphError, match="malformed"):
        graph_from_json('{"nodes": 3}')
    bad = dict(weights)
    bad.pop(next(iter(bad)))
    with pytest.raises(GraphError, match="missing"):
        graph.check_weights(bad)


def test_input_checks(tmp_path, fashion_cnn):
    graph, _ = _compile(fashion_cnn)
    check_input_fits(graph, np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(InputError, match=r"expects \(N, 1, 28, 28\)"):
        check_input_fits(graph, np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="batch dimension"):
        check_input_fits(graph, np.zeros((1, 28, 28), np.float32))
    with pytest.raises(InputError, match="NaN"):
        check_input_fits(graph, np.full((1, 1, 28, 28), np.nan, np.float32))
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="pickled objects are refused"):
        load_input(pickled)
    with pytest.raises(InputError, match="does not exist"):
        load_input(tmp_path / "none.npy")


def test_exact_rewrites_save_comparisons_and_change_no_output(fashion_cnn, fashion_test):
    """A ReLU read only by a max-pool moves after it (the demo CNN: 16,528 comparisons per image -> 9,472);
    a ReLU of a ReLU, and one before a clip that floors at 0, are dropped; the outputs stay the same."""
    from twinfer.protocols.cost_model import graph_cost, total_cost
    from twinfer.protocols.ir.graph import Node
    from twinfer.protocols.passes.plain import annotate_shapes, run_plain
    from twinfer.protocols.passes.rewrite import fewer_comparisons
    from twinfer.protocols.passes.validation import validate_graph

    data = export_onnx(fashion_cnn, torch.zeros(1, 1, 28, 28))
    before, weights = graph_from_onnx(onnx.load_from_string(data), rewrite=False)
    after, _ = graph_from_onnx(onnx.load_from_string(data))
    x = torch.from_numpy(fashion_test[0][:8])
    tw = {k: torch.from_numpy(v) for k, v in weights.items()}
    assert torch.equal(run_plain(before, tw, x), run_plain(after, tw, x))
    assert total_cost(graph_cost(before, 1)).comparisons == 16528 and total_cost(graph_cost(after, 1)).comparisons == 9472
    assert [n.attrs["rewrite"] for n in after.nodes if "rewrite" in n.attrs] == [
        "moved after max-pool '/features/features.2/MaxPool'", "moved after max-pool '/features/features.5/MaxPool'",
    ]  # fmt: skip
    nodes = [
        Node("a", "Relu", ("x",), "r1"), Node("b", "Relu", ("r1",), "r2"), Node("c", "Relu", ("r2",), "r3"),
        Node("cap", "Clip", ("r3",), "y", (), {"min": 0.0, "max": 6.0}),
    ]
    graph = Graph("x", (4,), "y", nodes, {})
    validate_graph(graph)
    annotate_shapes(graph, {})
    rewritten = fewer_comparisons(graph)
    assert [n.name for n in rewritten.nodes] == ["cap"] and rewritten.nodes[0].inputs == ("x",)
    z = torch.randn(16, 4) * 10
    assert torch.equal(run_plain(graph, {}, z), run_plain(rewritten, {}, z))
