"""The privacy ledger: epsilon from what ran (dp-accounting's for the same events), early stops, the manifest."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from dp_accounting import dp_event, pld, rdp

from twinfer.optimizer.data.dp_data import generate_zipf_clicks
from twinfer.optimizer.dp.ledger import LedgerError, PrivacyLedger
from twinfer.optimizer.dp.sparse_training import (
    MECH_GRADIENT,
    MECH_SELECTION,
    MECH_TOPK,
    DPTrainConfig,
    plan_privacy,
    train_dp,
    write_dp_artifact,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def small_data():
    return generate_zipf_clicks(vocab=5000, examples=3000, seed=3)


def _reference(event: dp_event.DpEvent, delta: float) -> tuple[float, float]:
    r = rdp.RdpAccountant()
    r.compose(event)
    p = pld.PLDAccountant(value_discretization_interval=1e-3)
    p.compose(event)
    return r.get_epsilon(delta), p.get_epsilon(delta)


def _adafest_ledger(q: float, s1: float, s2: float, topk: float) -> PrivacyLedger:
    ledger = PrivacyLedger()
    ledger.register("topk", noise_multiplier=topk, l2_sensitivity=math.sqrt(2))
    ledger.register("selection", noise_multiplier=s1, l2_sensitivity=1.0, sampling_rate=q, batch="step")
    ledger.register("gradient", noise_multiplier=s2, l2_sensitivity=0.5, sampling_rate=q, batch="step")
    return ledger


def test_ledger_epsilon_equals_dp_accounting_for_the_same_events():
    q, s1, s2, topk, steps, delta = 0.02, 2.0, 1.1, 15.0, 300, 1e-6
    ledger = _adafest_ledger(q, s1, s2, topk)
    ledger.record("topk")
    for _ in range(steps):
        ledger.record("selection", "gradient")
    s_eff = (s1**-2 + s2**-2) ** -0.5
    event = dp_event.ComposedDpEvent(
        [
            dp_event.GaussianDpEvent(topk),
            dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s_eff)), steps),
        ]
    )
    want_rdp, want_pld = _reference(event, delta)
    assert ledger.epsilon(delta, "rdp") == pytest.approx(want_rdp, rel=1e-9)
    assert ledger.epsilon(delta, "pld") == pytest.approx(want_pld, rel=1e-9)
    record = ledger.to_dict(delta)
    assert record["steps_run"] == steps and record["epsilon_rdp"] == pytest.approx(want_rdp, rel=1e-9)
    by_name = {m["name"]: m for m in record["mechanisms"]}
    assert by_name["topk"]["count"] == 1 and by_name["topk"]["sampling"] == "none"
    assert by_name["gradient"]["noise_std"] == pytest.approx(s2 * 0.5) and by_name["gradient"]["sampling_rate"] == q
    json.dumps(record)  # what the manifest stores


def test_a_selection_that_ran_more_often_than_the_gradient_is_accounted_on_its_own():
    q, s1, s2, delta = 0.05, 1.5, 1.2, 1e-5
    ledger = _adafest_ledger(q, s1, s2, 10.0)
    ledger.record("selection", "gradient", times=40)
    ledger.record("selection", times=3)  # e.g. stopped after selecting, before the gradient step
    s_eff = (s1**-2 + s2**-2) ** -0.5
    event = dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s_eff)), 40),
            dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s1)), 3),
        ]
    )
    assert ledger.epsilon(delta, "rdp") == pytest.approx(_reference(event, delta)[0], rel=1e-9)
    assert ledger.steps_run() == 43


def test_ledger_refuses_what_it_cannot_account():
    ledger = PrivacyLedger()
    assert ledger.epsilon(1e-5) == 0.0  # nothing ran, nothing spent
    ledger.register("gradient", noise_multiplier=1.0, l2_sensitivity=1.0, sampling_rate=0.1, batch="step")
    with pytest.raises(LedgerError, match="never registered"):
        ledger.record("gradinet")
    with pytest.raises(LedgerError, match="already registered with other parameters"):
        ledger.register("gradient", noise_multiplier=2.0, l2_sensitivity=1.0, sampling_rate=0.1, batch="step")
    with pytest.raises(LedgerError, match="one batch has one sampling rate"):
        ledger.register("selection", noise_multiplier=2.0, l2_sensitivity=1.0, sampling_rate=0.2, batch="step")
    with pytest.raises(ValueError, match="noise multiplier must be finite and not negative"):
        ledger.register("clear", noise_multiplier=-1.0, l2_sensitivity=1.0)
    ledger.register("clear", noise_multiplier=0.0, l2_sensitivity=1.0)  # a mechanism without noise ...
    ledger.record("clear")
    assert ledger.epsilon(1e-5, "rdp") == ledger.epsilon(1e-5, "pld") == math.inf  # ... guarantees nothing


@pytest.mark.parametrize("method", ["fest", "adafest"])
def test_a_run_stopped_early_records_fewer_steps_and_a_smaller_epsilon(small_data, method, tmp_path):
    config = DPTrainConfig(method=method, epsilon=3.0, epochs=2.0, batch_size=300, fest_topk=100, threshold_sigmas=2.0)
    plan = plan_privacy(config, len(small_data.train_ids))
    full = train_dp(small_data, config, privacy=plan)
    cut = train_dp(small_data, DPTrainConfig(**{**config.__dict__, "max_steps": 5}), privacy=plan)
    assert full.spent["steps_run"] == plan.steps == len(full.stats.seconds) > 5
    assert cut.spent["steps_run"] == 5 == len(cut.stats.seconds)
    # The whole run spends what was planned; the cut one, less, by both accountants.
    assert full.spent["epsilon_rdp"] == pytest.approx(plan.epsilon_rdp, rel=1e-9)
    assert full.spent["epsilon_pld"] == pytest.approx(plan.epsilon_pld, rel=1e-6)
    assert cut.spent["epsilon_rdp"] < 0.8 * full.spent["epsilon_rdp"] and cut.spent["epsilon_pld"] < full.spent["epsilon_pld"]
    counts = {m.name: m.count for m in cut.ledger.mechanisms}
    if method == "fest":
        assert counts == {MECH_TOPK: 1, MECH_GRADIENT: 5}  # DP top-k runs once, before training
    else:
        assert counts == {MECH_SELECTION: 5, MECH_GRADIENT: 5}
    manifest = json.loads((write_dp_artifact(tmp_path / "cut", cut, small_data) / "manifest.json").read_text())
    assert manifest["steps_run"] == 5 and manifest["privacy"]["steps"] == plan.steps
    assert manifest["epsilon"] == pytest.approx(cut.spent["epsilon_rdp"])  # the spent epsilon, not the plan's
    assert manifest["epsilon_pld"] == pytest.approx(cut.spent["epsilon_pld"])
    assert {m["name"] for m in manifest["privacy_ledger"]["mechanisms"]} == set(counts)


def test_an_empty_poisson_batch_still_counts_as_a_step(small_data):
    """An empty batch still runs the mechanisms (their noise is released), so the ledger counts it."""
    config = DPTrainConfig(method="adafest", epsilon=3.0, epochs=1.0, batch_size=300, max_steps=3)
    plan = plan_privacy(config, len(small_data.train_ids))
    empty = replace(small_data, train_ids=small_data.train_ids[:1], train_labels=small_data.train_labels[:1])
    result = train_dp(empty, config, privacy=plan)  # sampling rate planned for 2700 examples: batches of 0 or 1
    assert result.ledger.count(MECH_GRADIENT) == result.ledger.count(MECH_SELECTION) == 3
    assert min(result.stats.batch_sizes) == 0
    assert torch.isfinite(result.model.table).all()


def test_the_command_reports_what_a_cut_run_spent_and_when_sparsity_does_not_pay(capsys, tmp_path):
    from twinfer.deploy.cli.cli import main

    args = ["train-dp", "--data", "movielens-100k", "--epsilon", "3", "--epochs", "1", "--selection", "adafest", "--max-steps", "2"]
    assert main(args + ["--json", "--out", str(tmp_path / "cut")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    spent, plan = summary["privacy_spent"], summary["privacy"]
    assert spent["steps_run"] == summary["steps_run"] == 2 < plan["steps"]
    assert spent["epsilon_rdp"] < plan["epsilon_rdp"] <= 3.0 and spent["epsilon_pld"] < plan["epsilon_pld"]
    assert "sparsity does not pay in training time" in summary["note"]  # 2,820 rows vs 65,536 lookups a batch
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert manifest["epsilon"] == pytest.approx(spent["epsilon_rdp"]) and manifest["steps_run"] == 2
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epsilon spent (2 steps run)" in out and "(PLD)" in out and "adafest_contribution_map" in out
