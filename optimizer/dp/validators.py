"""Validators for privacy settings: refuse a guarantee that would mean nothing, and say what to change.

Like Opacus's module validators (opacus/validators/), they collect every problem before raising,
and each problem names the setting, why it voids the guarantee, and the change that fixes it.
What is refused:

- epsilon that is not a positive finite number;
- delta outside (0, 1/N): a mechanism that publishes one random example in the clear is
  (0, 1/N)-DP, so a delta of 1/N or more allows exactly that;
- a clipping norm that is not positive and finite: without it one example's influence on the
  gradient is unbounded and no amount of noise hides it;
- a sampling rate of 1 on a tiny dataset (every step reads every example: nothing is amplified
  by sampling, and the noise is not small against the whole data's gradient), or an expected
  batch larger than the data (the rate would silently be capped at 1);
- a DP top-k or AdaFEST split whose noise parameters are not positive;
- an epsilon that needs a noise multiplier under MIN_NOISE_MULTIPLIER (checked once the noise
  is solved): the noise is then much smaller than one example's clipped contribution, so each
  step nearly shows whether an example was in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twinfer.optimizer.dp.accounting import PrivacyBudgetError, TrainingPrivacy, compute_epsilon

if TYPE_CHECKING:
    from twinfer.optimizer.dp.sparse_training import DPTrainConfig

MIN_NOISE_MULTIPLIER = 0.3
# Below this many training examples a sampling rate of 1 (full-batch steps) is refused.
SMALL_DATASET = 1000


@dataclass(frozen=True)
class PrivacyProblem:
    """One setting that voids the guarantee: which, its value, why, and what to change."""

    setting: str
    value: object
    why: str
    fix: str

    def __str__(self) -> str:
        return f"{self.setting} = {self.value}: {self.why}; {self.fix}"


class PrivacyConfigError(PrivacyBudgetError):
    """The privacy settings would give no meaningful guarantee; `problems` lists every reason."""

    def __init__(self, problems: list[PrivacyProblem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the privacy settings give no meaningful guarantee ({len(self.problems)} to change):\n{lines}")


def config_problems(config: "DPTrainConfig", n_train: int) -> list[PrivacyProblem]:
    """Every problem with `config` for `n_train` training examples (empty when there is none)."""
    problems: list[PrivacyProblem] = []
    n = int(n_train)
    if n < 1:
        return [PrivacyProblem("training examples", n, "there is no training data", "load a dataset with examples")]
    eps = config.epsilon
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        problems.append(
            PrivacyProblem("epsilon (--epsilon)", eps, "a guarantee needs a positive finite epsilon", "ask for, say, epsilon 1, 3 or 8")
        )
    if config.delta is not None:
        d = config.delta
        if not (d > 0 and math.isfinite(d)):
            problems.append(PrivacyProblem("delta (--delta)", d, "delta must be a positive probability", f"set delta below 1/N = {1 / n:.3g}"))
        elif d >= 1.0 / n:
            problems.append(
                PrivacyProblem(
                    "delta (--delta)",
                    d,
                    f"it is not below 1/N = {1 / n:.3g} (N = {n} training examples): publishing one random example "
                    "in the clear meets delta = 1/N, so the guarantee would allow exactly that",
                    f"set delta below {1 / n:.3g}, e.g. {0.1 / n:.3g} (what --delta auto picks)",
                )
            )
    clip = config.clip
    if not (clip > 0 and math.isfinite(clip)):
        problems.append(
            PrivacyProblem(
                "clip (--clip)",
                clip,
                "without a positive finite clipping norm one example can move the gradient without bound, "
                "so no amount of noise hides it",
                "set a finite clipping norm such as 1.0",
            )
        )
    batch = config.batch_size
    if batch >= n and n < SMALL_DATASET:
        problems.append(
            PrivacyProblem(
                "batch_size (--batch-size)",
                batch,
                f"with only {n} training examples that is a sampling rate of 1: every step reads every example, "
                "so nothing is amplified by sampling, and the noise (std sigma*C) is not small against the "
                f"gradient of the whole data (at most {n}*C)",
                f"sample about a tenth of the data per step (batch_size {max(1, n // 10)}), or train on more examples",
            )
        )
    elif batch > n:
        problems.append(
            PrivacyProblem(
                "batch_size (--batch-size)",
                batch,
                f"the expected batch exceeds the {n} training examples, so the sampling rate would be capped at 1 "
                "and the batch size would not mean what it says",
                f"set batch_size at most {n} (or, for sampling amplification, well below it)",
            )
        )
    if config.method == "fest" and config.fest_frequencies == "dp":
        t = config.topk_noise_multiplier
        if not (t is not None and t > 0 and math.isfinite(t)):
            problems.append(
                PrivacyProblem(
                    "topk_noise_multiplier (--topk-noise)",
                    t,
                    "the DP top-k counts need positive finite noise, or they publish the true id counts",
                    "set a noise multiplier such as 20, or --fest-frequencies public if the counts really are public",
                )
            )
    if config.method == "adafest" and not 0.0 < config.selection_share < 1.0:
        problems.append(
            PrivacyProblem(
                "selection_share (--selection-share)",
                config.selection_share,
                "AdaFEST's selection and gradient both need noise: a share of 0 or 1 leaves one of them without any",
                "use a share strictly between 0 and 1, such as 0.2 or 0.5",
            )
        )
    return problems


def noise_problems(
    noise_multiplier: float,
    *,
    epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "rdp",
    topk_noise_multiplier: float | None = None,
) -> list[PrivacyProblem]:
    """The solved noise multiplier is too small for the guarantee to mean anything."""
    if noise_multiplier >= MIN_NOISE_MULTIPLIER:
        return []
    try:
        largest = compute_epsilon(
            TrainingPrivacy(sampling_rate, steps, MIN_NOISE_MULTIPLIER, topk_noise_multiplier), delta, accountant
        )
        fix = f"ask for epsilon at most {largest:.3g} (noise multiplier {MIN_NOISE_MULTIPLIER} for these steps), or train more epochs"
    except PrivacyBudgetError:
        fix = "ask for a smaller epsilon, or train more epochs"
    return [
        PrivacyProblem(
            "epsilon (--epsilon)",
            epsilon,
            f"it needs a noise multiplier of only {noise_multiplier:.3g} (sampling rate {sampling_rate:.4g}, {steps} steps), "
            f"under {MIN_NOISE_MULTIPLIER}: the noise is then much smaller than one example's clipped contribution, "
            "so each step nearly shows whether an example was in the batch",
            fix,
        )
    ]


def check_privacy_config(config: "DPTrainConfig", n_train: int) -> None:
    """Raise PrivacyConfigError listing every problem, or return."""
    problems = config_problems(config, n_train)
    if problems:
        raise PrivacyConfigError(problems)
