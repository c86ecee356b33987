"""MOFHEI: HE-friendly conversion, block pruning and culling, the cost model against a private run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from twinfer.optimizer.common.artifact import export_artifact
from twinfer.optimizer.common.graph_module import GraphModule
from twinfer.optimizer.mofhei.block_pruning import (
    BlockPruner,
    PruneConfig,
    PruningError,
    UnstructuredPruner,
    check_sparsity,
    cull,
    parameter_count,
    prunable,
    train_pruned,
)
from twinfer.optimizer.mofhei.he_friendly import (
    ConversionConfig,
    ConversionError,
    FitConfig,
    PolyAct,
    Split,
    convert_he_friendly,
)
from twinfer.optimizer.mofhei.mofhei import artifact_graph, cost_report, format_report, optimize_mofhei
from twinfer.protocols.cost_model import BlockShape, graph_cost, pruned_graph, total_cost
from twinfer.protocols.passes.onnx_export import export_onnx
from twinfer.parties.runtime.session_spec import SessionSpec

QUICK = FitConfig(epochs=1, lr=1e-3, patience=1, batch_size=32)


def small_lenet(act=nn.ReLU, pool=nn.MaxPool2d) -> nn.Sequential:
    """LeNet's shape at 12x12: padded conv, pool, unpadded conv, pool, two dense layers."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), act(), pool(2),
        nn.Conv2d(4, 6, 3), act(), pool(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 12), act(), nn.Linear(12, 10),
    )  # fmt: skip


def toy_split(n: int = 96, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 12, 12, generator=g)
    y = (x.mean(dim=(1, 2, 3)) * 1000).long() % 10  # learnable enough; only the mechanics matter
    return Split.of(x, y, val_fraction=0.25)


def random_polys(model: nn.Module) -> None:
    """Nonzero c0 everywhere, so culling must fold the pruned channels' constants."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, PolyAct):
            m.coeffs.data = torch.tensor([0.3, 0.6, 0.1]) + 0.1 * torch.rand(3, generator=g)


def he_lenet() -> nn.Sequential:
    torch.manual_seed(0)
    model = small_lenet(PolyAct, nn.AvgPool2d)
    random_polys(model)
    return model.eval()


# -- conversion ------------------------------------------------------------------------------------


def test_conversion_leaves_no_maxpool_or_relu():
    torch.manual_seed(0)
    model = small_lenet()
    logs = convert_he_friendly(model, toy_split(), ConversionConfig(per_layer=QUICK, finetune=QUICK))
    kinds = [type(m) for m in model.modules()]
    assert nn.ReLU not in kinds and nn.MaxPool2d not in kinds
    assert kinds.count(PolyAct) == 3 and kinds.count(nn.AvgPool2d) == 2
    # one stage per replaced layer (last to first), then the fine-tune
    assert [s.stage for s in logs][:2] == ["replace 8", "replace 5"] and logs[-1].stage == "fine-tune"


def test_conversion_of_an_onnx_model_exports_polynomial_sites(tmp_path):
    torch.manual_seed(0)
    model = GraphModule.from_onnx(export_onnx(small_lenet().eval(), torch.zeros(1, 1, 12, 12)))
    data = toy_split()
    convert_he_friendly(model, data, ConversionConfig(per_layer=QUICK, finetune=QUICK))
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in model.modules())
    export_artifact(model, data.x_train[:1], tmp_path / "art", {})
    graph = artifact_graph(tmp_path / "art")
    ops = [n.op for n in graph.nodes]
    assert "MaxPool" not in ops and "Relu" not in ops and ops.count("MaskedRelu") == 3
    assert graph.relu_count() == 0


def test_each_stage_trains_the_replaced_layer_and_those_after_it(monkeypatch):
    from twinfer.optimizer.mofhei import he_friendly

    stages = []
    real_fit = he_friendly.fit

    def recording_fit(model, data, config, *, stage="train", params=None, after_step=None):
        names = {id(p): n for n, p in model.named_parameters()}
        trained = sorted(names[id(p)] for p in (params if params is not None else model.parameters()))
        stages.append((stage, trained))
        return real_fit(model, data, config, stage=stage, params=params, after_step=after_step)

    monkeypatch.setattr(he_friendly, "fit", recording_fit)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(200, 8), nn.ReLU(), nn.Linear(8, 10))
    convert_he_friendly(model, toy_split(), ConversionConfig(per_layer=QUICK, finetune=QUICK))
    assert stages == [
        ("replace 4", ["4.coeffs", "5.bias", "5.weight"]),
        ("replace 1", ["1.coeffs", "3.bias", "3.weight", "4.coeffs", "5.bias", "5.weight"]),
        ("fine-tune", sorted(n for n, _ in model.named_parameters())),
    ]


def test_bad_requests_are_refused():
    for bad in (-0.1, 1.0, 1.5, float("nan"), "lots"):
        with pytest.raises(PruningError, match=r"\[0, 1\)"):
            check_sparsity(bad)
    with pytest.raises(ConversionError, match="unknown conversion 'hefriendly'"):
        optimize_mofhei(small_lenet(), toy_split(), convert="hefriendly")
    with pytest.raises(ConversionError, match="nothing to do"):
        optimize_mofhei(small_lenet(), toy_split(), convert=None)
    with pytest.raises(ConversionError, match="other than ReLU"):
        convert_he_friendly(nn.Sequential(nn.Flatten(), nn.Linear(144, 10), nn.Tanh(), nn.Linear(10, 10)), toy_split())
    with pytest.raises(ValueError, match="tiles"):
        BlockShape("tile")


# -- pruning and culling ---------------------------------------------------------------------------


def test_culled_model_equals_masked_model_on_random_inputs():
    model = he_lenet()
    pruner = BlockPruner.for_model(model, 0.5)
    pruner.update()
    assert pruner.kept() == {"0": 2, "3": 3, "7": 6}  # the logits layer (9) is never pruned
    x = torch.randn(16, 1, 12, 12)
    culled = cull(model, pruner.masks, x)
    with torch.no_grad():
        torch.testing.assert_close(culled(x), model(x), rtol=1e-5, atol=1e-5)
    assert [m.weight.shape for m in culled if isinstance(m, (nn.Conv2d, nn.Linear))] == [
        (2, 1, 3, 3), (3, 2, 3, 3), (6, 12), (10, 6),
    ]  # fmt: skip
    assert parameter_count(culled) < parameter_count(model)
    assert all(bool((m.weight.abs().sum(dim=tuple(range(1, m.weight.dim()))) > 0).all()) for m in culled if hasattr(m, "weight"))


def test_culling_a_graph_module_built_from_onnx():
    torch.manual_seed(0)
    onnx_model = GraphModule.from_onnx(export_onnx(small_lenet().eval(), torch.zeros(1, 1, 12, 12)))
    x = torch.randn(8, 1, 12, 12)
    pruner = BlockPruner.for_model(onnx_model, 0.5)
    pruner.update()
    culled = cull(onnx_model, pruner.masks, x)
    with torch.no_grad():
        torch.testing.assert_close(culled(x), onnx_model(x), rtol=1e-5, atol=1e-5)
    assert len(pruner.kept()) == 3 and parameter_count(culled) < parameter_count(onnx_model)


def test_padded_consumer_of_a_nonzero_constant_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), PolyAct((0.5, 1.0, 0.1)), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 144, 10))
    pruner = BlockPruner.for_model(model, 0.5)
    pruner.update()
    with pytest.raises(PruningError, match="zero-pads"):
        cull(model, pruner.masks, torch.zeros(1, 1, 12, 12))


def test_a_model_culling_cannot_follow_is_refused_before_training(monkeypatch):
    from twinfer.optimizer.mofhei import he_friendly

    monkeypatch.setattr(he_friendly, "fit", lambda *a, **k: pytest.fail("trained a model that cannot be culled"))
    padded = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 144, 10))
    with pytest.raises(PruningError, match="zero-pads"):
        optimize_mofhei(padded, toy_split(), convert="he-friendly", prune_blocks=0.5)


def test_training_keeps_pruned_blocks_at_zero_and_unstructured_keeps_shapes():
    data = toy_split()
    model = he_lenet()
    pruner = BlockPruner.for_model(model, 0.5)
    train_pruned(model, data, pruner, PruneConfig(every=2, search=QUICK, settle=QUICK))
    for name, layer in prunable(model):
        dead = ~pruner.masks[name]
        assert float(layer.weight.detach()[dead].abs().sum()) == 0.0 and float(layer.bias.detach()[dead].abs().sum()) == 0.0
    base = he_lenet()
    unstructured = UnstructuredPruner.for_model(base, 0.8)
    train_pruned(base, data, unstructured, PruneConfig(every=2, search=QUICK, settle=QUICK))
    for _, layer in prunable(base):
        assert math.isclose(float((layer.weight == 0).float().mean()), 0.8, abs_tol=0.05)
    assert parameter_count(base) == parameter_count(he_lenet())


def test_masks_naming_the_logits_layer_are_refused():
    model = he_lenet()
    with pytest.raises(PruningError, match="logits"):
        cull(model, {"9": torch.ones(10, dtype=torch.bool)}, torch.zeros(1, 1, 12, 12))


# -- cost model ------------------------------------------------------------------------------------


def test_pruned_graph_predicts_the_culled_models_cost(tmp_path):
    model = he_lenet()
    x = torch.randn(2, 1, 12, 12)
    model(x)
    export_artifact(model, x[:1], tmp_path / "before", {})
    before = artifact_graph(tmp_path / "before")
    pruner = BlockPruner.for_model(model, 0.5)
    pruner.update()
    culled = cull(model, pruner.masks, x)
    culled(x)
    export_artifact(culled, x[:1], tmp_path / "after", {})
    after = artifact_graph(tmp_path / "after")
    names = {n: g.name for n, g in zip(["0", "3", "7"], [n for n in before.nodes if n.op in ("Conv", "Gemm")])}
    predicted = pruned_graph(before, {names[k]: v for k, v in pruner.kept().items()})
    for batch in (1, 3):
        assert [c.as_dict() for c in graph_cost(predicted, batch)] == [c.as_dict() for c in graph_cost(after, batch)]
    assert total_cost(graph_cost(after)).bytes_online < total_cost(graph_cost(before)).bytes_online


def test_cost_model_matches_a_measured_private_run(tmp_path):
    """Real dealer, server and client processes over gRPC; bytes within 5% (in fact exact).

    The model has every layer kind the cost model prices: Beaver conv and matmul, polynomial
    sites, a full ReLU, average and max pooling, the output opening.
    """
    from twinfer.deploy.launch.local import run_local_session
    from twinfer.parties.runtime.model_file import read_model_bytes
    from twinfer.parties.wire.transport import TransportOptions

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), PolyAct((0.2, 0.5, 0.1)), nn.AvgPool2d(2),
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 8), PolyAct(), nn.Linear(8, 10),
    ).eval()  # fmt: skip
    x = torch.randn(2, 1, 12, 12)
    model(x)
    export_artifact(model, x[:1], tmp_path / "art", {})
    graph = artifact_graph(tmp_path / "art")
    options = TransportOptions(connect_timeout_s=60.0)  # a loaded 2-core machine starts processes slowly
    reports = run_local_session(read_model_bytes(tmp_path / "art"), x.numpy(), spec=SessionSpec(options=options), batch=2, timeout_s=300)
    predicted = graph_cost(graph, batch=2)
    for role in ("client", "server"):
        r = reports[role]
        measured_total = r.batch_bytes_online[0]
        assert abs(total_cost(predicted).bytes_online - measured_total) <= 0.05 * measured_total
        for c in predicted:
            layer = r.layers[c.name]
            assert c.bytes_online == layer["bytes_sent"] + layer["bytes_received"], (role, c.name)
            assert c.rounds == layer["rounds"], (role, c.name)
    assert total_cost(predicted).rounds == reports["client"].batch_rounds[0]
    with torch.no_grad():
        np.testing.assert_allclose(reports["client"].logits, model(x).numpy(), atol=2e-2)
    measured = {
        n: {"bytes_online": v["bytes_sent"] + v["bytes_received"], "rounds": v["rounds"]}
        for n, v in reports["client"].layers.items()
    } | {"total": {"bytes_online": reports["client"].batch_bytes_online[0], "rounds": reports["client"].batch_rounds[0]}}
    report = cost_report(graph, graph, batch=2, measured_before=measured, measured_after=measured)
    total = report["layers"][-1]
    assert total["layer"] == "total" and total["after"]["bytes_online_measured"] == total["after"]["bytes_online_predicted"]
    assert "bytes measured" in format_report(report)


# -- twinfer optimize ------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Training beside other processes on 2 cores: one intra-op thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_twinfer_optimize_converts_prunes_and_writes_a_smaller_dense_artifact(tmp_path, capsys, one_thread):
    from twinfer.deploy.cli.cli import main
    from twinfer.optimizer.zoo.demo_models import lenet5
    from twinfer.parties.runtime.model_file import load_model

    torch.manual_seed(0)
    (tmp_path / "lenet.onnx").write_bytes(export_onnx(lenet5().eval(), torch.zeros(1, 1, 28, 28)))
    out = tmp_path / "lenet-p90"
    argv = ["optimize", "--model", str(tmp_path / "lenet.onnx"), "--data", "mnist", "--train-samples", "200", "--out", str(out)]
    assert main(argv + ["--convert", "he-friendly", "--prune-blocks", "0.9"]) == 0
    graph, weights = load_model(out)  # what `twinfer infer --model out/` loads: digests, sites, relu_count
    ops = [n.op for n in graph.nodes]
    assert "Relu" not in ops and "MaxPool" not in ops and graph.relu_count() == 0
    for key, w in weights.items():  # dense: every remaining filter / neuron has nonzero weights
        if key.endswith("weight"):
            assert (np.abs(w).reshape(w.shape[0], -1).sum(axis=1) > 0).all(), key
    conv_out = [graph.weight_shapes[n.weights[0]][0] for n in graph.nodes if n.op == "Conv"]
    assert conv_out == [1, 2]  # 6 -> 1 and 16 -> 2 filters at 90% target sparsity
    manifest = __import__("json").loads((out / "manifest.json").read_text())
    cost = manifest["mofhei"]["cost_predicted"]["layers"][-1]
    assert cost["layer"] == "total" and cost["after"]["bytes_online_predicted"] < 0.2 * cost["before"]["bytes_online_predicted"]
    assert cost["before"]["relu_count"] > 0 and cost["after"]["relu_count"] == 0 and cost["after"]["poly_count"] > 0

    assert main(argv + ["--convert", "he_friendly"]) != 0
    assert "unknown conversion 'he_friendly'" in capsys.readouterr().err
    assert main(argv + ["--prune-blocks", "1.0"]) != 0
    assert "[0, 1)" in capsys.readouterr().err
