"""Privacy-config validators: meaningless guarantees refused, every reason listed, each with what to change."""

from __future__ import annotations

import pytest

from twinfer.optimizer.dp.accounting import TrainingPrivacy, compute_epsilon, solve_noise_multiplier
from twinfer.optimizer.dp.sparse_training import DPTrainConfig, plan_privacy
from twinfer.optimizer.dp.validators import MIN_NOISE_MULTIPLIER, PrivacyConfigError, config_problems

pytestmark = pytest.mark.timeout(120)

N = 80_000


def _refused(config: DPTrainConfig, n: int = N) -> PrivacyConfigError:
    with pytest.raises(PrivacyConfigError) as info:
        plan_privacy(config, n)
    return info.value


@pytest.mark.parametrize("delta", [1 / N, 1e-3, 1.0])
def test_delta_of_one_over_n_or_more_is_refused(delta):
    err = _refused(DPTrainConfig(epsilon=3, delta=delta))
    assert [p.setting for p in err.problems] == ["delta (--delta)"]
    assert f"below 1/N = {1 / N:.3g}" in str(err) and "publishing one random example" in str(err)
    assert "e.g. 1.25e-06 (what --delta auto picks)" in str(err)


def test_auto_delta_is_below_one_over_n():
    plan = plan_privacy(DPTrainConfig(epsilon=3, epochs=1), N)
    assert plan.delta == pytest.approx(0.1 / N)


def test_sampling_rate_one_on_a_tiny_dataset_is_refused():
    err = _refused(DPTrainConfig(epsilon=3, batch_size=8192), n=500)
    (problem,) = err.problems
    assert problem.setting == "batch_size (--batch-size)" and "sampling rate of 1" in problem.why
    assert "batch_size 50" in problem.fix
    assert config_problems(DPTrainConfig(epsilon=3, batch_size=50), 500) == []  # the suggested fix passes
    big = _refused(DPTrainConfig(epsilon=3, batch_size=N + 1))  # more than the data on a large set: capped rate
    assert "would be capped at 1" in str(big) and f"at most {N}" in str(big)


def test_a_clipping_norm_that_bounds_nothing_is_refused():
    err = _refused(DPTrainConfig(epsilon=3, clip=float("inf")))
    assert "clip (--clip) = inf" in str(err) and "no amount of noise hides it" in str(err)
    for clip in (0.0, float("nan")):  # these never make a config
        with pytest.raises(ValueError, match="clip must be positive"):
            DPTrainConfig(clip=clip)


def test_every_problem_is_listed_at_once():
    config = DPTrainConfig(method="fest", epsilon=float("inf"), delta=0.5, clip=float("inf"), topk_noise_multiplier=0.0)
    err = _refused(config)
    settings = [p.setting for p in err.problems]
    assert settings == ["epsilon (--epsilon)", "delta (--delta)", "clip (--clip)", "topk_noise_multiplier (--topk-noise)"]
    assert "(4 to change)" in str(err) and "--fest-frequencies public" in str(err)


def test_an_epsilon_that_needs_a_noise_multiplier_under_0_3_is_refused_with_the_largest_that_is_not():
    config = DPTrainConfig(epsilon=60, epochs=1)  # MovieLens-sized: q = 0.1024, 10 steps
    err = _refused(config)
    (problem,) = err.problems
    assert problem.setting == "epsilon (--epsilon)" and f"under {MIN_NOISE_MULTIPLIER}" in problem.why
    largest = float(problem.fix.split("at most ")[1].split(" ")[0])
    q, steps, delta = 8192 / N, 10, 0.1 / N
    assert largest == pytest.approx(compute_epsilon(TrainingPrivacy(q, steps, MIN_NOISE_MULTIPLIER), delta), rel=1e-2)
    assert solve_noise_multiplier(60, delta, q, steps) < MIN_NOISE_MULTIPLIER  # the refusal was warranted
    plan = plan_privacy(DPTrainConfig(epsilon=largest * 0.98, epochs=1), N)  # the suggested fix passes
    assert plan.noise_multiplier_effective >= MIN_NOISE_MULTIPLIER


def test_the_command_refuses_a_meaningless_delta_with_what_to_change(capsys):
    from twinfer.deploy.cli.cli import main

    code = main(["train-dp", "--data", "movielens-100k", "--epsilon", "3", "--delta", "0.01"])
    err = capsys.readouterr().err
    assert code == 2 and "delta (--delta) = 0.01" in err and "set delta below 1.25e-05" in err and "Traceback" not in err
