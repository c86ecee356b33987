"""DP embedding training: selection sampling, accounting, sparse steps, exact clipping, data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, rdp

from twinfer.optimizer.data.dp_data import DataError, generate_zipf_clicks, load_dataset
from twinfer.optimizer.dp.accounting import (
    PrivacyBudgetError,
    TrainingPrivacy,
    compute_epsilon,
    effective_noise_multiplier,
    solve_noise_multiplier,
    split_noise_multiplier,
)
from twinfer.optimizer.dp.embedding_model import EmbeddingMLP, auc, clipped_gradients
from twinfer.optimizer.dp.sparse_training import (
    DPTrainConfig,
    PrivacyReport,
    RowSelection,
    adafest_select,
    plan_privacy,
    private_gradient,
    sample_zero_count_rows,
    train_dp,
    zero_count_pass_probability,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def small_data():
    return generate_zipf_clicks(vocab=5000, examples=3000, seed=3)


def _privacy(q: float, steps: int, s2: float, s1: float | None = None) -> PrivacyReport:
    """A fixed privacy plan, so step tests need not solve for the noise."""
    return PrivacyReport(3.0, 1e-5, "rdp", q, steps, effective_noise_multiplier(s1, s2), s2, s1, None, 0.0, 0.0)


# -- DP-AdaFEST selection ------------------------------------------------------------------------


@pytest.mark.parametrize("s1,tau", [(1.0, 1.5), (2.0, 1.0), (0.5, 1.2)])
def test_zero_count_rows_pass_with_gaussian_tail_probability(s1, tau):
    gen = torch.Generator().manual_seed(0)
    vocab = 20_000
    touched = torch.unique(torch.randint(0, vocab, (3000,), generator=gen))
    p = zero_count_pass_probability(s1, tau)
    assert p == pytest.approx(0.5 * math.erfc(tau / s1 / math.sqrt(2)))
    n0, trials, hits = vocab - len(touched), 50, 0
    for _ in range(trials):
        rows = sample_zero_count_rows(vocab, touched, p, gen)
        assert len(torch.unique(rows)) == len(rows)  # distinct
        assert not torch.isin(rows, touched).any()  # never a touched row
        assert rows.min() >= 0 and rows.max() < vocab
        hits += len(rows)
    rate = hits / (n0 * trials)
    std = math.sqrt(p * (1 - p) / (n0 * trials))
    assert abs(rate - p) < 5 * std, (rate, p)


def test_zero_count_sampling_is_uniform_over_untouched_rows():
    gen = torch.Generator().manual_seed(1)
    vocab = 1000
    touched = torch.arange(0, 1000, 2)  # even rows touched: only odd rows may come back
    counts = torch.zeros(vocab)
    for _ in range(400):
        rows = sample_zero_count_rows(vocab, touched, 0.05, gen)
        counts[rows] += 1
    assert counts[touched].sum() == 0
    odd = counts[1::2]
    assert abs(odd[:250].sum() - odd[250:].sum()) < 5 * math.sqrt(odd.sum())  # no drift towards either end


def test_adafest_selection_of_touched_rows_follows_noisy_counts():
    gen = torch.Generator().manual_seed(2)
    s1, tau = 1.0, 2.0
    rows = torch.zeros(4, 1, dtype=torch.long)  # row 0 has true count 4 (one field: weight 1)
    passes = 0
    trials = 4000
    for _ in range(trials):
        touched, passed, extra = adafest_select(rows, 10, s1, tau, "l2", gen)
        assert touched.tolist() == [0] and not torch.isin(extra, touched).any()
        passes += int(passed[0])
    expected = 0.5 * math.erfc((tau - 4.0) / s1 / math.sqrt(2))  # P(4 + N(0, 1) > 2)
    assert abs(passes / trials - expected) < 5 * math.sqrt(expected * (1 - expected) / trials)


# -- accounting ----------------------------------------------------------------------------------


def test_combined_noise_multiplier_and_epsilon_match_plain_dp_sgd():
    q, steps, delta = 0.01, 500, 1e-5
    s1, s2 = split_noise_multiplier(1.2, 0.25)
    assert (s1, s2) == pytest.approx((2.4, 1.2 / math.sqrt(0.75)))
    effective = effective_noise_multiplier(s1, s2)
    assert effective == pytest.approx(1.2)
    assert effective_noise_multiplier(2.0, 2.0) == pytest.approx(math.sqrt(2.0))
    ours = compute_epsilon(TrainingPrivacy(q, steps, effective), delta, "rdp")
    reference = rdp.RdpAccountant()
    reference.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.2)), steps)
    assert ours == pytest.approx(reference.get_epsilon(delta), rel=1e-9)


def test_noise_solved_from_epsilon_spends_the_target():
    q, steps, delta = 0.05, 100, 1e-5
    sigma = solve_noise_multiplier(2.0, delta, q, steps)
    assert compute_epsilon(TrainingPrivacy(q, steps, sigma), delta) <= 2.0
    assert compute_epsilon(TrainingPrivacy(q, steps, sigma * 0.99), delta) > 2.0  # not more noise than needed


def test_adafest_plan_spends_what_dp_sgd_at_its_effective_noise_spends():
    n = 10_000
    ada = plan_privacy(DPTrainConfig(method="adafest", epsilon=3, epochs=2, batch_size=500, selection_share=0.3), n)
    s1, s2 = ada.noise_multiplier_selection, ada.noise_multiplier_gradient
    assert ada.noise_multiplier_effective == pytest.approx((s1**-2 + s2**-2) ** -0.5)
    assert s2 > ada.noise_multiplier_effective  # selection costs gradient noise
    reference = rdp.RdpAccountant()  # plain DP-SGD with the same effective noise and sampling
    reference.compose(dp_event.PoissonSampledDpEvent(500 / n, dp_event.GaussianDpEvent(ada.noise_multiplier_effective)), ada.steps)
    assert ada.epsilon_rdp == pytest.approx(reference.get_epsilon(0.1 / n), rel=1e-9)  # delta auto: 0.1/N
    assert ada.epsilon_rdp <= 3.0 and ada.delta == pytest.approx(0.1 / n) and ada.epsilon_pld <= ada.epsilon_rdp


def test_impossible_settings_are_refused_clearly():
    with pytest.raises(PrivacyBudgetError, match="out of reach for 100000 steps"):
        solve_noise_multiplier(0.01, 1e-5, 1.0, 100_000)
    with pytest.raises(PrivacyBudgetError, match="DP top-k selection alone spends"):
        solve_noise_multiplier(0.5, 1e-5, 0.01, 10, topk_noise_multiplier=1.0)
    with pytest.raises(PrivacyBudgetError, match="epsilon must be a positive"):
        solve_noise_multiplier(0.0, 1e-5, 0.01, 10)
    with pytest.raises(PrivacyBudgetError, match="delta must be in"):
        solve_noise_multiplier(1.0, 1.5, 0.01, 10)
    with pytest.raises(ValueError, match="unknown selection method"):
        DPTrainConfig(method="sparse")


# -- training steps ------------------------------------------------------------------------------


@pytest.mark.parametrize("buffers", ["sparse", "dense"])
@pytest.mark.parametrize("method", ["fest", "adafest"])
def test_a_step_touches_only_selected_rows(small_data, method, buffers):
    config = DPTrainConfig(
        method=method,
        batch_size=300,
        threshold_sigmas=3.0,
        fest_topk=200,
        fest_frequencies="public",
        max_steps=1,
        seed=4,
        buffers=buffers,
    )
    s1 = 2.0 if method == "adafest" else None
    result = train_dp(small_data, config, privacy=_privacy(0.1, 10, 1.0, s1))
    table = result.model.table.detach()
    changed = (table != 0).any(1)
    vocab = table.shape[0]
    assert changed.sum() > 0
    assert not (changed & ~result.updated).any()  # every changed row was selected
    assert result.stats.gradient_rows[0] == int(result.updated.sum()) < vocab  # a sparse gradient
    if method == "fest":
        assert result.stats.gradient_rows[0] == 200 + small_data.vocab_sizes[1]  # top-k ids + the small field
    else:
        # the batch touched far more rows than passed; the untouched, unselected rows stay exactly zero.
        # Zero-count rows must be sampled too (otherwise selection reveals which rows a batch touched).
        # A selected row that no training example has, and that is not a dense-field row, can only be
        # such a sample: counted from the data alone, it bounds the reported count from below, and the
        # selected rows outside the dense field bound it from above.
        fp = result.stats.false_positive_rows[0]
        offsets = np.cumsum([0, *small_data.vocab_sizes[:-1]])
        seen = np.zeros(vocab, dtype=bool)
        seen[(small_data.train_ids + offsets).ravel()] = True
        dense = np.zeros(vocab, dtype=bool)
        dense[offsets[1] : offsets[1] + small_data.vocab_sizes[1]] = True  # the small field, selected every step
        selected = result.updated.numpy()  # one step: the rows selected in it
        never_seen = int((selected & ~seen & ~dense).sum())
        assert 0 < never_seen <= fp <= int((selected & ~dense).sum()), (never_seen, fp)
        assert int(result.updated.sum()) < result.stats.true_rows[0] + small_data.vocab_sizes[1] + 50


@pytest.mark.parametrize("method", ["fest", "adafest"])
def test_dense_and_sparse_buffers_give_the_same_noise_free_gradient(small_data, method):
    """The V x d buffers used on small tables change the cost, not the gradient."""
    model = EmbeddingMLP(small_data.vocab_sizes, dim=4, hidden=8, seed=0)
    with torch.no_grad():
        model.table.normal_(generator=torch.Generator().manual_seed(0))
    ids, labels = torch.from_numpy(small_data.train_ids[:200]), torch.from_numpy(small_data.train_labels[:200])
    offsets = model.offsets.tolist()
    dense_rows = torch.arange(offsets[1], offsets[1] + small_data.vocab_sizes[1])  # the small context field
    common = dict(dense_rows=dense_rows, sparse_cols=(0,))
    if method == "fest":
        common |= dict(fixed_rows=torch.unique(torch.cat([torch.arange(0, 5000, 7), dense_rows])))
    else:  # selection noise so small that exactly the touched rows pass and no zero-count row does
        common |= dict(s1=1e-6, tau=0.5)
    grads = [
        private_gradient(
            model, ids, labels, clip=0.5, sigma_c=0.0, selection=RowSelection(method, dense_buffers=b, **common), gen=torch.Generator()
        )
        for b in (False, True)
    ]
    assert torch.equal(grads[0].rows, grads[1].rows) and grads[0].touched == grads[1].touched
    torch.testing.assert_close(grads[0].table, grads[1].table)
    if method == "adafest":
        touched = torch.unique(model.rows(ids)[:, 0])
        assert torch.equal(grads[0].rows, torch.unique(torch.cat([touched, dense_rows])))
        assert grads[0].false_positive == grads[1].false_positive == 0


def test_dense_dp_sgd_updates_every_row(small_data):
    config = DPTrainConfig(method="dense", batch_size=300, max_steps=2)
    result = train_dp(small_data, config, privacy=_privacy(0.1, 10, 1.0))
    assert bool((result.model.table != 0).any(1).all())
    assert result.stats.gradient_rows == [result.model.table.shape[0]] * 2


def test_clipped_gradients_equal_per_example_autograd():
    torch.manual_seed(0)
    model = EmbeddingMLP([7, 5, 3], dim=4, hidden=6, seed=1)
    with torch.no_grad():
        model.table.normal_()  # non-zero rows, so every term of the norm is exercised
    ids = torch.stack([torch.randint(0, v, (9,)) for v in (7, 5, 3)], 1)
    labels = (torch.rand(9) > 0.5).float()
    clip = 0.5
    ours = clipped_gradients(model, ids, labels, clip)

    params = dict(model.named_parameters())

    def loss_one(p, x, y):
        out = torch.func.functional_call(model, p, (x[None],))
        return torch.nn.functional.binary_cross_entropy_with_logits(out, y[None], reduction="sum")

    per = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, ids, labels)
    norms = torch.sqrt(sum((g.reshape(9, -1) ** 2).sum(1) for g in per.values()))
    torch.testing.assert_close(ours.norms, norms, rtol=1e-4, atol=1e-6)
    c = torch.clamp(clip / norms, max=1.0)
    for name, got in zip(["w1", "b1", "w2", "b2"], ours.mlp):
        torch.testing.assert_close(got, (per[name] * c.reshape(-1, *[1] * (per[name].dim() - 1))).sum(0), rtol=1e-4, atol=1e-6)
    dense_table = (per["table"] * c[:, None, None]).sum(0)
    sparse_table = torch.zeros_like(dense_table).index_add_(0, ours.rows.flatten(), ours.row_grads.reshape(-1, 4))
    torch.testing.assert_close(sparse_table, dense_table, rtol=1e-4, atol=1e-6)


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # ties on purpose
    labels = rng.random(300) > 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc(scores, labels) == pytest.approx(brute)


# -- data ----------------------------------------------------------------------------------------


def test_movielens_from_the_installed_wheel():
    data = load_dataset("movielens-100k")
    assert len(data.train_ids) + len(data.test_ids) == 100_000
    assert data.fields[:2] == ["user", "item"] and data.vocab_sizes[:2] == [943, 1682]
    assert not data.generated
    for f, size in enumerate(data.vocab_sizes):
        assert data.train_ids[:, f].min() >= 0 and data.train_ids[:, f].max() < size
    assert 0.5 < data.train_labels.mean() < 0.6  # share of ratings >= 4


def test_validation_split_comes_from_training_examples_only():
    data = generate_zipf_clicks(vocab=1000, examples=500)
    split = data.validation_split(0.2, seed=1)
    assert len(split.test_ids) == 90 and len(split.train_ids) == 360  # 450 training examples
    rows = {tuple(r) + (lab,) for r, lab in zip(data.train_ids.tolist(), data.train_labels.tolist())}
    split_rows = [tuple(r) + (lab,) for r, lab in zip(split.test_ids.tolist(), split.test_labels.tolist())]
    assert all(r in rows for r in split_rows)
    assert np.array_equal(np.sort(np.concatenate([split.train_labels, split.test_labels])), np.sort(data.train_labels))
    assert split.generated and "validation" in split.name
    with pytest.raises(DataError, match="validation fraction"):
        data.validation_split(1.0)


def test_generated_data_says_so_and_unknown_names_fail():
    data = generate_zipf_clicks(vocab=1000, examples=500)
    assert data.generated and "GENERATED" in data.description and data.summary()["generated"] is True
    with pytest.raises(DataError, match="unknown dataset 'criteo'.*movielens-100k"):
        load_dataset("criteo")


# -- the command ---------------------------------------------------------------------------------


def test_train_dp_command_writes_a_loadable_artifact(tmp_path, capsys):
    from twinfer.deploy.cli.cli import main
    from twinfer.parties.runtime.model_file import check_input_fits, load_model

    out = tmp_path / "ml-dp"
    code = main(["train-dp", "--data", "movielens-100k", "--epsilon", "3", "--epochs", "1", "--selection", "fest", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "fest" and summary["privacy"]["epsilon_rdp"] <= 3.0
    assert summary["dataset"]["generated"] is False
    graph, _ = load_model(out)
    check_input_fits(graph, np.load(out / "queries.npy"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selection"] == "fest" and manifest["privacy"]["topk_noise_multiplier"] == 20.0  # DP top-k, composed
    assert sum(manifest["rows_dropped"].values()) > 0  # items outside the top-k are not deployed


def test_train_dp_command_refuses_an_impossible_budget(capsys):
    from twinfer.deploy.cli.cli import main

    code = main(["train-dp", "--data", "movielens-100k", "--epsilon", "0.001", "--epochs", "2000"])
    err = capsys.readouterr().err
    assert code == 2 and "out of reach" in err and "Traceback" not in err
