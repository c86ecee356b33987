"""A privacy ledger: every mechanism that touched the private data, and epsilon computed from it.

A training run registers each mechanism once (its noise multiplier, the L2 sensitivity of what
it releases, the Poisson sampling rate of the data it reads) and records it every time it runs.
Epsilon is then computed from the record, not from the plan, so a run cut short reports what
its steps actually spent. Mechanisms that read the same Poisson-sampled batch in the same step
(DP-AdaFEST's noisy contribution map and the gradient noise) share a `batch` name; in a step
where several of them ran, they are together one Gaussian mechanism with
s_eff = (sum_i s_i^-2)^(-1/2) on that batch (Ghazi et al. 2023, arXiv 2311.08357, Sec. 3).
The events go to dp-accounting (RDP and PLD), the same package and settings as
optimizer/dp/accounting.py.

As JSON (`to_dict`):

    {"delta": 1.25e-06, "steps_run": 98, "epsilon_rdp": 2.99, "epsilon_pld": 2.71,
     "mechanisms": [
       {"name": "dp_topk_counts", "mechanism": "gaussian", "noise_multiplier": 20.0,
        "l2_sensitivity": 2.83, "noise_std": 56.6, "sampling": "none", "sampling_rate": 1.0,
        "batch": null, "count": 1, "releases": "noisy id counts of every field, once"},
       {"name": "gradient_noise", ..., "sampling": "poisson", "sampling_rate": 0.1024,
        "batch": "step", "count": 98, "releases": "..."}]}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting import dp_event

from twinfer.optimizer.dp.accounting import ACCOUNTANTS, PrivacyBudgetError, make_accountant, quiet_absl


# Below this noise multiplier the PLD accountant's discretised loss would need petabytes; such a
# mechanism hides next to nothing (the validators refuse a plan under 0.3), so PLD reports inf.
PLD_MIN_NOISE = 0.05


class LedgerError(ValueError):
    """A mechanism was recorded that the ledger does not know, or registered twice differently."""


@dataclass
class Mechanism:
    """One Gaussian mechanism on the private data, and how many times it ran."""

    name: str
    noise_multiplier: float  # noise standard deviation / L2 sensitivity (0: no noise, epsilon inf)
    l2_sensitivity: float  # of what one run releases, with respect to one example
    sampling_rate: float | None  # Poisson rate of the examples it reads; None: all of them
    batch: str | None = None  # mechanisms with the same name read the same sampled batch per step
    releases: str = ""
    count: int = 0

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.l2_sensitivity

    def to_dict(self) -> dict:
        return asdict(self) | {
            "mechanism": "gaussian",
            "noise_std": self.noise_std,
            "sampling": "none" if self.sampling_rate is None else "poisson",
            "sampling_rate": 1.0 if self.sampling_rate is None else self.sampling_rate,
        }


class PrivacyLedger:
    """Mechanisms registered up front, counted as they run; epsilon from what was counted."""

    def __init__(self) -> None:
        self._mechanisms: dict[str, Mechanism] = {}

    def register(
        self,
        name: str,
        *,
        noise_multiplier: float,
        l2_sensitivity: float,
        sampling_rate: float | None = None,
        batch: str | None = None,
        releases: str = "",
    ) -> Mechanism:
        """Declare a mechanism (count 0). Registering the same name again with other parameters fails."""
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise PrivacyBudgetError(f"mechanism {name!r}: the noise multiplier must be finite and not negative, got {noise_multiplier}")
        if not (l2_sensitivity > 0 and math.isfinite(l2_sensitivity)):
            raise PrivacyBudgetError(f"mechanism {name!r}: the L2 sensitivity must be positive and finite, got {l2_sensitivity}")
        if sampling_rate is not None and not 0.0 < sampling_rate <= 1.0:
            raise PrivacyBudgetError(f"mechanism {name!r}: the sampling rate must be in (0, 1], got {sampling_rate}")
        if batch is not None and sampling_rate is None:
            raise LedgerError(f"mechanism {name!r}: only Poisson-sampled mechanisms share a batch")
        new = Mechanism(name, noise_multiplier, l2_sensitivity, sampling_rate, batch, releases)
        old = self._mechanisms.get(name)
        if old is not None:
            if (old.noise_multiplier, old.l2_sensitivity, old.sampling_rate, old.batch) != (
                new.noise_multiplier,
                new.l2_sensitivity,
                new.sampling_rate,
                new.batch,
            ):
                raise LedgerError(f"mechanism {name!r} is already registered with other parameters: {old}")
            return old
        for other in self._mechanisms.values():
            if batch is not None and other.batch == batch and other.sampling_rate != sampling_rate:
                raise LedgerError(
                    f"mechanisms {other.name!r} and {name!r} share batch {batch!r} but sample at "
                    f"{other.sampling_rate} and {sampling_rate}: one batch has one sampling rate"
                )
        self._mechanisms[name] = new
        return new

    def record(self, *names: str, times: int = 1) -> None:
        """Each named mechanism ran `times` more times (call it as soon as the noisy value exists)."""
        for name in names:
            if name not in self._mechanisms:
                raise LedgerError(f"mechanism {name!r} ran but was never registered; known: {', '.join(self._mechanisms) or 'none'}")
        for name in names:
            self._mechanisms[name].count += times

    @property
    def mechanisms(self) -> list[Mechanism]:
        return list(self._mechanisms.values())

    def count(self, name: str) -> int:
        return self._mechanisms[name].count if name in self._mechanisms else 0

    def steps_run(self, batch: str = "step") -> int:
        """Steps of the sampled batch `batch`: the most any of its mechanisms ran."""
        return max((m.count for m in self._mechanisms.values() if m.batch == batch), default=0)

    def gaussians(self) -> list[tuple[float, float | None, int]]:
        """The record as (noise multiplier, sampling rate or None, times) Gaussian mechanisms."""
        out: list[tuple[float, float | None, int]] = []
        batches: dict[str, list[Mechanism]] = {}
        for m in self._mechanisms.values():
            if m.count == 0:
                continue
            if m.batch is not None:
                batches.setdefault(m.batch, []).append(m)
                continue
            out.append((m.noise_multiplier, m.sampling_rate, m.count))
        for group in batches.values():
            # In the first min(count) steps every mechanism of the group ran; after that, those
            # with more runs: each stretch is one Gaussian on the batch with the combined noise.
            done = 0
            for level in sorted({m.count for m in group}):
                active = [m for m in group if m.count >= level]
                noises = [m.noise_multiplier for m in active]
                combined = 0.0 if min(noises) == 0 else sum(s**-2 for s in noises) ** -0.5
                out.append((combined, active[0].sampling_rate, level - done))
                done = level
        return out

    def dp_event(self) -> dp_event.DpEvent:
        """The whole record as one dp-accounting event (NoOp when nothing ran)."""
        events: list[dp_event.DpEvent] = []
        for noise, rate, times in self.gaussians():
            one = dp_event.GaussianDpEvent(noise)
            if rate is not None:
                one = dp_event.PoissonSampledDpEvent(rate, one)
            events.append(dp_event.SelfComposedDpEvent(one, times))
        if not events:
            return dp_event.NoOpDpEvent()
        return events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon at `delta` of everything recorded, by dp-accounting's RDP or PLD accountant."""
        if accountant not in ACCOUNTANTS:
            raise PrivacyBudgetError(f"unknown accountant {accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}")
        if not 0.0 < delta < 1.0:
            raise PrivacyBudgetError(f"delta must be in (0, 1), got {delta}")
        event = self.dp_event()
        if isinstance(event, dp_event.NoOpDpEvent):
            return 0.0
        smallest = min(noise for noise, _, _ in self.gaussians())
        if smallest == 0 or (accountant == "pld" and smallest < PLD_MIN_NOISE):
            return math.inf  # no noise: no guarantee (and PLD's grid cannot hold a loss that large)
        acc: dp_accounting.PrivacyAccountant = make_accountant(accountant)
        with quiet_absl():
            acc.compose(event)
            return float(acc.get_epsilon(delta))

    def to_dict(self, delta: float, batch: str = "step") -> dict:
        """The record, with epsilon by both accountants (the artifact manifest's `privacy_ledger`)."""
        return {
            "delta": delta,
            "steps_run": self.steps_run(batch),
            "epsilon_rdp": self.epsilon(delta, "rdp"),
            "epsilon_pld": self.epsilon(delta, "pld"),
            "mechanisms": [m.to_dict() for m in self._mechanisms.values()],
        }
