"""A DP-trained MovieLens model served privately: artifact, graph import, id checks, real parties."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from helpers.party_processes import Parties
from twinfer.optimizer.data.dp_data import load_dataset
from twinfer.optimizer.dp.embedding_model import predict
from twinfer.optimizer.dp.sparse_training import DPTrainConfig, encode_for_artifact, train_dp, write_dp_artifact
from twinfer.parties.errors import InputError
from twinfer.parties.runtime.model_file import check_input_fits, load_model
from twinfer.protocols.ops.embedding import LookupCost, encode_input
from twinfer.protocols.ir.graph import GraphError
from twinfer.protocols.passes.onnx_import import graph_from_onnx
from twinfer.protocols.passes.plain import run_plain

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def movielens():
    return load_dataset("movielens-100k")


@pytest.fixture(scope="module")
def trained(movielens, tmp_path_factory):
    """One epoch of DP-AdaFEST at epsilon 3 with a high threshold, so some rows are never selected."""
    config = DPTrainConfig(method="adafest", epsilon=3.0, epochs=1, threshold_sigmas=3.0, selection_share=0.3)
    result = train_dp(movielens, config)
    out = write_dp_artifact(tmp_path_factory.mktemp("ml-dp") / "ml-dp", result, movielens)
    return result, out


def test_artifact_drops_unselected_rows_and_predicts_like_the_trained_model(trained, movielens):
    result, artifact = trained
    manifest = json.loads((artifact / "manifest.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier_effective", "accountant", "selection", "rows_kept", "rows_dropped", "test_auc"):
        assert key in manifest
    assert manifest["selection"] == "adafest" and manifest["epsilon"] <= 3.0
    ledger = manifest["privacy_ledger"]  # what the run spent, mechanism by mechanism
    assert manifest["steps_run"] == ledger["steps_run"] == result.privacy.steps
    assert {m["name"]: m["count"] for m in ledger["mechanisms"]} == {
        "adafest_contribution_map": result.privacy.steps,
        "gradient_noise": result.privacy.steps,
    }
    assert manifest["epsilon"] == manifest["epsilon_rdp"] == ledger["epsilon_rdp"] and ledger["epsilon_pld"] <= ledger["epsilon_rdp"]
    dropped = sum(manifest["rows_dropped"].values())
    assert dropped > 0 and dropped + sum(manifest["rows_kept"].values()) == movielens.vocab_total
    graph, weights = load_model(artifact)
    embedding = graph.nodes[0]
    assert embedding.op == "Embedding" and embedding.attrs["rows"] == manifest["deployed_table_rows"] == movielens.vocab_total - dropped + 1
    ids = movielens.test_ids[:200]
    rows = encode_for_artifact(artifact, ids)
    plain = run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, torch.from_numpy(rows.astype(np.float32)))
    # Dropped rows were exactly zero in training, so the smaller table predicts identically.
    np.testing.assert_allclose(plain.squeeze(1).numpy(), predict(result.model, ids), atol=1e-5)
    one_hot = encode_input(graph, torch.from_numpy(rows[:3].astype(np.float32)))
    assert one_hot.shape == (3, len(movielens.fields), embedding.attrs["rows"]) and one_hot.sum() == 3 * len(movielens.fields)


def test_embedding_ids_out_of_range_or_fractional_are_refused(trained):
    _, artifact = trained
    graph, _ = load_model(artifact)
    rows, fields = graph.nodes[0].attrs["rows"], graph.input_shape[0]
    ok = np.zeros((2, fields), np.float32)
    check_input_fits(graph, ok)
    too_big = ok.copy()
    too_big[1, 1] = rows
    with pytest.raises(InputError, match=rf"out of range: input\[1, 1\] = {rows}.*rows 0..{rows - 1}"):
        check_input_fits(graph, too_big)
    negative = ok.copy()
    negative[0, 0] = -1
    with pytest.raises(InputError, match="out of range"):
        check_input_fits(graph, negative)
    fractional = ok.copy()
    fractional[0, 2] = 1.5
    with pytest.raises(InputError, match="must be integers"):
        check_input_fits(graph, fractional)


def test_gather_is_accepted_only_as_a_lookup_at_the_input():
    table = numpy_helper.from_array(np.ones((5, 2), np.float32), "table")
    scale = numpy_helper.from_array(np.ones((1, 3), np.float32), "scale")
    nodes = [
        helper.make_node("Mul", ["ids", "scale"], ["computed"], name="mul"),
        helper.make_node("Gather", ["table", "computed"], ["out"], name="lookup"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 2])],
        [table, scale],
    )
    with pytest.raises(GraphError, match="only as an embedding lookup.*straight from the model input"):
        graph_from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_dp_trained_movielens_model_served_privately_over_grpc(trained, movielens, tmp_path):
    """Real dealer, server and client processes; the private predictions equal the plaintext ones."""
    result, artifact = trained
    ids = movielens.test_ids[:12]
    rows = encode_for_artifact(artifact, ids).astype(np.float32)
    queries = tmp_path / "queries.npy"
    np.save(queries, rows)
    parties = Parties(tmp_path)
    try:
        dealer = parties.start_dealer()
        server = parties.start_server(artifact, "--dealer", dealer)
        out = tmp_path / "logits.npy"
        parties.start_client(server, queries, "--dealer", dealer, "--batch", "6", "--output", str(out))
        code, client, err = parties.finish("client")
        assert code == 0, err
        assert parties.finish("server")[0] == 0 and parties.finish("dealer")[0] == 0
    finally:
        parties.close()
    private = np.load(out).squeeze(1)
    np.testing.assert_allclose(private, predict(result.model, ids), atol=1e-2)
    graph, _ = load_model(artifact)
    lookup = client["layers"]["embedding"]
    cost = LookupCost.predict(6, len(movielens.fields), graph.nodes[0].attrs["rows"], graph.nodes[0].attrs["dim"])
    assert lookup["bytes_sent"] == lookup["bytes_received"] == 2 * cost.bytes_online // 2  # 2 batches, each way
    assert lookup["rounds"] == 2 * cost.rounds
