"""Privacy accounting for DP embedding training, on Google's dp-accounting package.

One training run is T steps of a Poisson-sampled Gaussian mechanism. In DP-AdaFEST the
selection (noise s1 on the contribution map) and the gradient (noise s2 C) act on the same
sampled batch, so each step is one Gaussian mechanism with the effective noise multiplier
s_eff = (s1^-2 + s2^-2)^(-1/2) (Ghazi et al. 2023, arXiv 2311.08357, Sec. 3). A DP top-k
selection run once before training (DP-FEST) composes with it as one more Gaussian mechanism.
The math here is dp-accounting's (RDP or PLD); this module only builds the events and solves
for the noise.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import dp_accounting
from dp_accounting import dp_event, pld, rdp

ACCOUNTANTS = ("rdp", "pld")
# Past this noise multiplier the gradient is drowned; a budget that needs more is refused.
MAX_NOISE_MULTIPLIER = 100.0


class PrivacyBudgetError(ValueError):
    """The asked privacy settings cannot be met (or make no sense)."""


@dataclass(frozen=True)
class TrainingPrivacy:
    """What a run spends: sampling rate, steps, noise, and an optional one-off DP top-k."""

    sampling_rate: float
    steps: int
    noise_multiplier: float  # effective: selection and gradient combined
    topk_noise_multiplier: float | None = None  # DP-FEST's DP top-k, run once

    def event(self) -> dp_event.DpEvent:
        train = dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(self.sampling_rate, dp_event.GaussianDpEvent(self.noise_multiplier)), self.steps
        )
        if self.topk_noise_multiplier is None:
            return train
        return dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(self.topk_noise_multiplier), train])


def effective_noise_multiplier(selection: float | None, gradient: float) -> float:
    """s_eff = (s1^-2 + s2^-2)^(-1/2); without a selection step it is the gradient's noise."""
    if gradient <= 0 or (selection is not None and selection <= 0):
        raise PrivacyBudgetError(f"noise multipliers must be positive, got selection={selection}, gradient={gradient}")
    if selection is None:
        return gradient
    return (selection**-2 + gradient**-2) ** -0.5


def split_noise_multiplier(effective: float, selection_share: float) -> tuple[float, float]:
    """(s1, s2) whose combination is `effective`, with `selection_share` of 1/s_eff^2 spent on selection."""
    if not 0.0 < selection_share < 1.0:
        raise PrivacyBudgetError(f"selection_share must be in (0, 1), got {selection_share}")
    return effective / math.sqrt(selection_share), effective / math.sqrt(1.0 - selection_share)


def make_accountant(name: str) -> dp_accounting.PrivacyAccountant:
    if name == "rdp":
        return rdp.RdpAccountant()
    if name == "pld":  # a 1e-3 grid moves epsilon by about 1e-4 here and is 6x faster than the default
        return pld.PLDAccountant(value_discretization_interval=1e-3)
    raise PrivacyBudgetError(f"unknown accountant {name!r}; choose one of: {', '.join(ACCOUNTANTS)}")


def _check_common(delta: float, sampling_rate: float, steps: int) -> None:
    if not 0.0 < delta < 1.0:
        raise PrivacyBudgetError(f"delta must be in (0, 1), got {delta}")
    if not 0.0 < sampling_rate <= 1.0:
        raise PrivacyBudgetError(f"the sampling rate must be in (0, 1], got {sampling_rate}")
    if steps < 1:
        raise PrivacyBudgetError(f"training needs at least one step, got {steps}")


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """dp-accounting logs a warning for each RDP order it skips (harmless: that order is not used)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def compute_epsilon(privacy: TrainingPrivacy, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by the run at `delta`, from dp-accounting's RDP or PLD accountant."""
    _check_common(delta, privacy.sampling_rate, privacy.steps)
    acc = make_accountant(accountant)
    with quiet_absl():
        acc.compose(privacy.event())
        return float(acc.get_epsilon(delta))


def solve_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    accountant: str = "rdp",
    topk_noise_multiplier: float | None = None,
) -> float:
    """The smallest effective noise multiplier whose run spends at most `target_epsilon`.

    Raises PrivacyBudgetError when no noise multiplier up to MAX_NOISE_MULTIPLIER meets the
    target (too many steps for so small an epsilon), or when the one-off DP top-k alone
    already spends it.
    """
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise PrivacyBudgetError(f"epsilon must be a positive finite number, got {target_epsilon}")
    _check_common(delta, sampling_rate, steps)

    def eps_at(sigma: float, name: str = accountant) -> float:
        return compute_epsilon(TrainingPrivacy(sampling_rate, steps, sigma, topk_noise_multiplier), delta, name)

    if topk_noise_multiplier is not None:
        alone = make_accountant(accountant)
        with quiet_absl():
            alone.compose(dp_event.GaussianDpEvent(topk_noise_multiplier))
            spent = float(alone.get_epsilon(delta))
        if spent >= target_epsilon:
            raise PrivacyBudgetError(
                f"the DP top-k selection alone spends epsilon {spent:.3g} (noise multiplier "
                f"{topk_noise_multiplier}), which leaves nothing of the target {target_epsilon} for training; "
                "raise the top-k noise, use public frequencies, or raise epsilon"
            )
    at_max = eps_at(MAX_NOISE_MULTIPLIER)
    if at_max > target_epsilon:
        raise PrivacyBudgetError(
            f"epsilon {target_epsilon} at delta {delta:.3g} is out of reach for {steps} steps at sampling rate "
            f"{sampling_rate:.4g}: even noise multiplier {MAX_NOISE_MULTIPLIER:g} spends {at_max:.3g}. "
            "Train fewer epochs, sample smaller batches, or allow a larger epsilon"
        )
    # RDP is fast everywhere; PLD is slow at tiny noise but never looser than RDP, so its
    # answer lies below RDP's: bracket with RDP first, then refine with PLD under it.
    high = _bisect(lambda s: eps_at(s, "rdp"), target_epsilon, 1e-2, MAX_NOISE_MULTIPLIER)
    if accountant == "rdp":
        return high
    return _bisect(eps_at, target_epsilon, max(0.3, high / 2), high)


def _bisect(eps_at, target: float, low: float, high: float) -> float:
    """Smallest noise in [low, high] (to 0.1%) with eps_at(noise) <= target; eps falls as noise grows."""
    if eps_at(low) <= target:
        return low
    for _ in range(60):
        mid = math.sqrt(low * high) if high / low > 2 else (low + high) / 2
        if eps_at(mid) > target:
            low = mid
        else:
            high = mid
        if high - low < 1e-3 * high:
            break
    return high
