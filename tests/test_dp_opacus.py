"""Opacus, the dense DP-SGD baseline, against twinfer's dense step: the same clipped sums, the same noise."""

from __future__ import annotations

import math

import pytest
import torch

from twinfer.optimizer.data.dp_data import generate_zipf_clicks
from twinfer.optimizer.dp.embedding_model import EmbeddingMLP, clipped_gradients
from twinfer.optimizer.dp.opacus_baseline import OpacusTrainer, SgdAdam, make_private, opacus_epsilons, opacus_step, train_opacus
from twinfer.optimizer.dp.sparse_training import (
    DPTrainConfig,
    DPTrainer,
    PrivacyReport,
    RowSelection,
    _Adam,
    plan_privacy,
    private_gradient,
)

pytestmark = pytest.mark.timeout(120)

NAMES = ["table", "w1", "b1", "w2", "b2"]


def _model_and_batch(vocab: list[int], dim: int, hidden: int, batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = EmbeddingMLP(vocab, dim, hidden, seed=1)
    with torch.no_grad():
        model.table.normal_(generator=gen)  # non-zero rows, so every part of the gradient is exercised
    # Few distinct ids per field, so several examples share a row and the row sums add up.
    ids = torch.stack([torch.randint(0, min(v, 4), (batch,), generator=gen) for v in vocab], 1)
    labels = (torch.rand(batch, generator=gen) > 0.5).float()
    return model, ids, labels


def _twinfer(model, ids, labels, *, clip: float, sigma_c: float, seed: int = 0) -> list[torch.Tensor]:
    grad = private_gradient(
        model, ids, labels, clip=clip, sigma_c=sigma_c, selection=RowSelection("dense"), gen=torch.Generator().manual_seed(seed)
    )
    assert grad.rows is None  # dense: every row gets a gradient
    return [grad.table, *grad.mlp]


def _opacus(model, ids, labels, *, clip: float, noise: float, mode: str, seed: int = 0) -> list[torch.Tensor]:
    """p.grad after one Opacus step: its clipped sum plus its noise (loss_reduction="sum", lr 0)."""
    module, optimizer, criterion, _ = make_private(
        model,
        ids,
        labels,
        sampling_rate=1.0,
        noise_multiplier=noise,
        clip=clip,
        lr_embedding=0.0,
        lr_mlp=0.0,
        expected_batch=float(len(ids)),
        grad_sample_mode=mode,
        generator=torch.Generator().manual_seed(seed),
    )
    opacus_step(module, optimizer, criterion, ids, labels)
    return [p.grad.detach().clone() for p in module._module.twin_parameters()]


def _disagreement(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> str:
    parts = []
    for name, a, b in zip(NAMES, ours, theirs):
        diff = (a - b.reshape(a.shape)).abs().max().item()
        parts.append(f"{name}: max |diff| {diff:.3g} ({diff / max(a.abs().max().item(), 1e-12):.3g} of its largest entry)")
    return "; ".join(parts)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_opacus_and_twinfer_clip_and_sum_the_same_without_noise(mode):
    model, ids, labels = _model_and_batch([7, 5, 3], dim=4, hidden=6, batch=12)
    clip = 1.0
    norms = clipped_gradients(model, ids, labels, clip).norms
    assert norms.max() > clip > norms.min()  # some examples are clipped, some are not
    ours = _twinfer(model, ids, labels, clip=clip, sigma_c=0.0)
    theirs = _opacus(model, ids, labels, clip=clip, noise=0.0, mode=mode)
    close = all(torch.allclose(a, b.reshape(a.shape), rtol=1e-4, atol=1e-6) for a, b in zip(ours, theirs))
    assert close, f"Opacus ({mode}) per-example clipping of nn.Embedding disagrees with twinfer's: {_disagreement(ours, theirs)}"
    assert ours[0].abs().sum() > 0 and (ours[0].abs().sum(1) == 0).any()  # touched rows only, others exactly zero


def test_opacus_and_twinfer_add_noise_of_the_same_variance():
    model, ids, labels = _model_and_batch([1000, 500], dim=8, hidden=16, batch=64)
    clip, noise = 0.5, 1.3
    std = noise * clip
    flat = lambda grads: torch.cat([g.flatten() for g in grads])  # noqa: E731
    ours = flat(_twinfer(model, ids, labels, clip=clip, sigma_c=std, seed=3)) - flat(_twinfer(model, ids, labels, clip=clip, sigma_c=0.0))
    theirs = flat(_opacus(model, ids, labels, clip=clip, noise=noise, mode="ghost", seed=4)) - flat(
        _opacus(model, ids, labels, clip=clip, noise=0.0, mode="ghost")
    )
    n = ours.numel()
    assert n > 12_000
    for who, diff in (("twinfer", ours), ("opacus", theirs)):
        ratio = (diff.double().var() / std**2).item()
        assert abs(ratio - 1.0) < 5 * math.sqrt(2.0 / n), f"{who}: noise variance {ratio:.4f} x (s C)^2"
        assert abs(diff.double().mean().item()) < 5 * std / math.sqrt(n), who
    assert (ours - theirs).abs().max() > 0  # two independent draws, not the same numbers twice


def test_opacus_optimizer_steps_like_train_dp():
    """SgdAdam (the optimizer Opacus wraps) updates exactly as train_dp: SGD on rows, its Adam on the MLP."""
    gen = torch.Generator().manual_seed(0)
    table, w = torch.randn(6, 3, generator=gen), torch.randn(4, 2, generator=gen)
    p_table, p_w = torch.nn.Parameter(table.clone()), torch.nn.Parameter(w.clone())
    ref_w = torch.nn.Parameter(w.clone())
    opt, ref = SgdAdam(p_table, [p_w], lr_table=2.0, lr_mlp=0.01, grad_scale=0.25), _Adam([ref_w], 0.01)
    ref_table = table.clone()
    for _ in range(3):
        g_table, g_w = torch.randn(6, 3, generator=gen), torch.randn(4, 2, generator=gen)
        p_table.grad, p_w.grad = g_table.clone(), g_w.clone()
        opt.step()
        ref.step([g_w * 0.25])
        ref_table -= 2.0 * 0.25 * g_table
    torch.testing.assert_close(p_table.detach(), ref_table)
    torch.testing.assert_close(p_w.detach(), ref_w.detach())


def test_opacus_and_twinfer_dense_runs_follow_the_same_trajectory_without_noise():
    """Full batches, noise off, clipping active: six steps of each land on the same weights."""
    data = generate_zipf_clicks(vocab=1000, examples=600, seed=5)
    plan = PrivacyReport(3.0, 1e-5, "rdp", 1.0, 6, 0.0, 0.0, None, None, 0.0, 0.0)  # q = 1, no noise
    config = DPTrainConfig(method="dense", batch_size=len(data.train_ids), clip=0.1, lr_embedding=40.0, lr_mlp=0.01)
    ours, theirs = DPTrainer(data, config, privacy=plan), OpacusTrainer(data, config, privacy=plan)
    twin = theirs.module._module
    with torch.no_grad():  # off the zero table, where every ReLU sits at 0 and only b2 could move
        ours.model.table.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        ours.model.b1.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        twin.embedding.weight.copy_(ours.model.table)
        twin.fc1.bias.copy_(ours.model.b1)
    start = ours.model.table.detach().clone()
    for _ in range(6):
        ours.step()
        theirs.step()
    got = [p.detach() for p in twin.twin_parameters()]
    want = [p.detach() for p in (ours.model.table, *ours.model.mlp_parameters())]
    assert (want[0] - start).abs().max() > 1e-2  # it moved
    assert all(torch.allclose(w, g.reshape(w.shape), rtol=1e-4, atol=1e-5) for w, g in zip(want, got)), _disagreement(want, got)
    assert ours.ledger.epsilon(1e-5) == math.inf  # and without noise the ledger promises nothing


def test_opacus_run_samples_at_the_planned_rate_and_its_accountant_agrees_with_the_ledger():
    data = generate_zipf_clicks(vocab=5000, examples=3000, seed=3)
    config = DPTrainConfig(method="dense", epsilon=3.0, epochs=1.0, batch_size=300, max_steps=4)
    plan = plan_privacy(config, len(data.train_ids))
    result = train_opacus(data, config, privacy=plan)
    assert result.summary()["method"] == "opacus"
    spent = result.spent
    assert spent["steps_run"] == 4 < plan.steps and spent["epsilon_rdp"] < plan.epsilon_rdp
    theirs = opacus_epsilons(plan.noise_multiplier_gradient, plan.sampling_rate, 4, plan.delta)
    assert theirs["rdp"] == pytest.approx(spent["epsilon_rdp"], rel=1e-3)  # two RDP implementations, one history
    assert theirs["prv"] == pytest.approx(spent["epsilon_pld"], rel=0.05)  # PRV and PLD: both near-tight numerics
    n, q = len(data.train_ids), plan.sampling_rate
    drawn = sum(result.stats.batch_sizes)
    assert abs(drawn - 4 * q * n) < 5 * math.sqrt(4 * q * (1 - q) * n)  # Poisson sampling at the planned rate
    assert result.stats.gradient_rows == [data.vocab_total] * 4  # dense
    assert (result.model.table != 0).any(1).all()  # every row got noise
