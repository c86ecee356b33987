"""Sparsity-preserving DP training of embedding models: DP-FEST, DP-AdaFEST and dense DP-SGD.

Ghazi et al., "Sparsity-Preserving Differentially Private Training of Large Embedding Models",
NeurIPS 2023 (arXiv 2311.08357). Each step, for every method:
  1. Poisson-sample the batch (each example independently with probability q).
  2. Clip every example's gradient to L2 norm C (exact per-example norms, see
     dp_embedding_model.clipped_gradients) and sum.
  3. MLP weights (small, dense): add N(0, (s2 C)^2) to every coordinate.
  4. Embedding rows:
     - dense DP-SGD: a dense V x d gradient, noise on every row (the baseline);
     - DP-FEST: noise only on a fixed set of rows, the top-k per field by public or DP counts;
     - DP-AdaFEST: each example's contribution map (the rows it touches) is normalised to norm
       1, the maps are summed, N(0, s1^2) is added and rows above tau are kept; rows with zero
       true count pass with probability P(N(0, s1^2) > tau), drawn without visiting them
       (a binomial count, then that many distinct rows), so the selected set does not reveal
       which rows the batch touched. Noise N(0, (s2 C)^2) goes on the selected rows only.
  5. Update only the rows that got a gradient (SGD); the gradient is kept as (rows, values).
Privacy: selection and gradient noise act on the same sampled batch, one Gaussian mechanism with
s_eff = (s1^-2 + s2^-2)^(-1/2) per step (optimizer/dp/accounting.py). The noise is planned for
the configured epochs; what is spent is what the run's ledger recorded (optimizer/dp/ledger.py):
every mechanism, each time it ran, so a run stopped early reports the smaller epsilon it spent.

Working buffers: the released gradient is always (selected rows, values), but when the table is
no larger than the row lookups of one batch (V <= expected batch x fields, a public fact) the
sums are built in a V x d buffer, and AdaFEST's noisy counts are drawn for every row (the same
distribution as sampling the zero-count rows): sorting the batch's rows would cost more than
the table. On such tables sparsity saves little training time; it still shrinks the deployed
table (rows never selected are dropped), which is what the private lookup pays for.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from twinfer.optimizer.data.dp_data import CategoricalData
from twinfer.optimizer.dp.accounting import (
    TrainingPrivacy,
    compute_epsilon,
    effective_noise_multiplier,
    solve_noise_multiplier,
    split_noise_multiplier,
)
from twinfer.optimizer.dp.embedding_model import EmbeddingMLP, auc, clipped_gradients, predict
from twinfer.optimizer.dp.ledger import PrivacyLedger
from twinfer.optimizer.dp.validators import PrivacyConfigError, check_privacy_config, noise_problems
from twinfer.protocols.artifact import Artifact

METHODS = ("dense", "fest", "adafest")
ID_MAP_PREFIX = "id_to_row/"  # artifact tensors: per field, raw id -> row of the deployed table
FREQUENCY_SOURCES = ("dp", "public")
BUFFERS = ("auto", "dense", "sparse")
# delta=None means AUTO_DELTA / N; a delta of 1/N or more is refused (optimizer/dp/validators.py).
AUTO_DELTA = 0.1
# The ledger's names for the mechanisms a run can use, and the batch the per-step ones share.
MECH_TOPK = "dp_topk_counts"
MECH_SELECTION = "adafest_contribution_map"
MECH_GRADIENT = "gradient_noise"
STEP_BATCH = "step"


@dataclass
class DPTrainConfig:
    """Everything a run needs; `delta=None` means AUTO_DELTA / N."""

    method: str = "adafest"
    epsilon: float = 3.0
    delta: float | None = None
    accountant: str = "rdp"
    epochs: float = 10.0
    batch_size: int = 8192  # expected size of a Poisson-sampled batch
    clip: float = 1.0
    lr_embedding: float = 40.0  # SGD on the rows; the gradient is a sum over the batch / expected batch
    lr_mlp: float = 1e-2
    dim: int = 16
    hidden: int = 64
    # DP-AdaFEST
    selection_share: float = 0.2  # share of 1/s_eff^2 spent on selection: s1 = s_eff / sqrt(share)
    threshold_sigmas: float = 1.0  # tau = threshold_sigmas * s1
    contribution_norm: str = "l2"  # each example's map scaled to L2 norm 1 ("l1": total 1)
    # DP-FEST
    fest_topk: int = 1024  # rows kept per field
    fest_frequencies: str = "dp"  # "dp": noisy counts, cost composed; "public": counts taken as public
    topk_noise_multiplier: float = 20.0
    # FEST and AdaFEST: fields with at most this many ids have all their rows selected (a
    # public, data-independent choice; such tables are small, so dense noise there is cheap).
    dense_fields_max_vocab: int = 256
    seed: int = 0
    # Stop after this many steps; the noise stays planned for all the steps, and the ledger
    # accounts only the steps that ran.
    max_steps: int | None = None
    # Working buffers for the row sums: "auto" (V x d when V <= expected batch x fields), or forced.
    buffers: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown selection method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.fest_frequencies not in FREQUENCY_SOURCES:
            raise ValueError(f"fest_frequencies must be one of {FREQUENCY_SOURCES}, got {self.fest_frequencies!r}")
        if self.contribution_norm not in ("l1", "l2"):
            raise ValueError(f"contribution_norm must be 'l1' or 'l2', got {self.contribution_norm!r}")
        if self.buffers not in BUFFERS:
            raise ValueError(f"buffers must be one of {BUFFERS}, got {self.buffers!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or None for every planned step), got {self.max_steps}")
        for name in ("epochs", "batch_size", "clip", "lr_embedding", "lr_mlp", "dim", "hidden", "fest_topk", "threshold_sigmas"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class PrivacyReport:
    """The plan: noise solved so that `steps` steps spend `epsilon_target` (what ran is in the ledger)."""

    epsilon_target: float
    delta: float
    accountant: str
    sampling_rate: float
    steps: int
    noise_multiplier_effective: float
    noise_multiplier_gradient: float
    noise_multiplier_selection: float | None
    topk_noise_multiplier: float | None
    epsilon_rdp: float
    epsilon_pld: float


@dataclass
class StepStats:
    seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    gradient_rows: list[int] = field(default_factory=list)  # non-zero embedding-gradient rows
    true_rows: list[int] = field(default_factory=list)  # rows the batch touched
    false_positive_rows: list[int] = field(default_factory=list)  # AdaFEST: zero-count rows sampled

    def summary(self, vocab: int, dim: int) -> dict:
        grad_rows = float(np.mean(self.gradient_rows)) if self.gradient_rows else 0.0
        steady = self.seconds[1:] if len(self.seconds) > 1 else self.seconds
        return {
            "steps_run": len(self.seconds),
            "mean_batch": float(np.mean(self.batch_sizes)) if self.batch_sizes else 0.0,
            "mean_gradient_rows": grad_rows,
            "mean_touched_rows": float(np.mean(self.true_rows)) if self.true_rows else 0.0,
            "mean_false_positive_rows": float(np.mean(self.false_positive_rows)) if self.false_positive_rows else 0.0,
            "gradient_floats_per_step": grad_rows * dim,
            "dense_gradient_floats": vocab * dim,
            "step_s_median": float(np.median(steady)) if steady else 0.0,
            "step_s_mean": float(np.mean(steady)) if steady else 0.0,
        }


@dataclass
class DPTrainResult:
    model: EmbeddingMLP
    config: DPTrainConfig
    privacy: PrivacyReport
    stats: StepStats
    updated: torch.Tensor  # (V,) bool: rows that ever received a gradient
    test_auc: float
    train_s: float
    ledger: PrivacyLedger
    spent: dict  # ledger.to_dict(delta): mechanisms, counts, epsilon by RDP and PLD
    name: str | None = None  # how summaries label the run (default: the method)

    def rows_kept_per_field(self) -> dict[str, list[int]]:
        offsets = self.model.offsets.tolist()
        kept = [int(self.updated[o : o + v].sum()) for o, v in zip(offsets, self.model.vocab_sizes)]
        return {"kept": kept, "dropped": [v - k for v, k in zip(self.model.vocab_sizes, kept)]}

    def summary(self) -> dict:
        vocab = int(self.model.table.shape[0])
        return {
            "method": self.name or self.config.method,
            "test_auc": self.test_auc,
            "train_s": self.train_s,
            "privacy": asdict(self.privacy),
            "privacy_spent": self.spent,
            "rows_ever_updated": int(self.updated.sum()),
            "vocab_total": vocab,
        } | self.stats.summary(vocab, self.model.dim)


def zero_count_pass_probability(s1: float, tau: float) -> float:
    """P(N(0, s1^2) > tau)."""
    return 0.5 * math.erfc(tau / (s1 * math.sqrt(2.0)))


def sample_zero_count_rows(vocab: int, touched: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Rows outside `touched` (sorted, unique), each kept independently with probability p.

    Drawn as K ~ Binomial(n0, p) and then K distinct rows uniform among the n0 untouched
    ones: the same distribution as a coin per row, at a cost of O(K) rather than O(V).
    """
    n0 = vocab - len(touched)
    if n0 <= 0 or p <= 0:
        return torch.empty(0, dtype=torch.long)
    k = int(torch.binomial(torch.tensor(float(n0)), torch.tensor(p), generator=gen).item())
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if k > n0 // 4:  # dense regime: draw a permutation of the complement
        mask = torch.ones(vocab, dtype=torch.bool)
        mask[touched] = False
        free = mask.nonzero().squeeze(1)
        return free[torch.randperm(len(free), generator=gen)[:k]].sort().values
    # k << n0: pick k distinct ranks among the untouched rows, map rank -> row past the touched ones.
    chosen: set[int] = set()
    while len(chosen) < k:
        chosen.update(torch.randint(0, n0, (k - len(chosen),), generator=gen).tolist())
    ranks = torch.tensor(sorted(chosen), dtype=torch.long)
    # row = rank + (number of touched rows <= row): solve by searching touched - arange (non-decreasing).
    shifted = touched - torch.arange(len(touched))
    return ranks + torch.searchsorted(shifted, ranks, right=True)


def adafest_select(
    rows: torch.Tensor,
    vocab: int,
    s1: float,
    tau: float,
    norm: str,
    gen: torch.Generator,
    exclude: torch.Tensor | None = None,
    weight: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DP-AdaFEST selection for one batch: (touched rows, which of them pass, zero-count rows sampled).

    `rows` is B x F (the rows each example touches, one per field). Returns the unique touched rows, a bool
    mask over them, and the sampled zero-count rows. Rows in `exclude` (sorted; rows selected
    anyway, such as those of small dense fields) are never sampled as zero-count rows. `weight`
    (each touched row's share of an example's map) defaults to what `norm` gives for F fields.
    """
    touched, inverse = torch.unique(rows, return_inverse=True)
    # Field ranges are disjoint, so an example touches exactly F distinct rows: each gets
    # 1/sqrt(F) (L2 norm 1) or 1/F (total 1).
    if weight is None:
        fields = rows.shape[1]
        weight = 1.0 / (math.sqrt(fields) if norm == "l2" else fields)
    counts = torch.zeros(len(touched)).index_add_(0, inverse.flatten(), torch.full((inverse.numel(),), weight))
    noisy = counts + torch.randn(len(touched), generator=gen) * s1
    passed = noisy > tau
    taken = touched if exclude is None or len(exclude) == 0 else torch.unique(torch.cat([touched, exclude]))
    extra = sample_zero_count_rows(vocab, taken, zero_count_pass_probability(s1, tau), gen)
    return touched, passed, extra


def dp_topk_rows(
    data: CategoricalData, offsets: list[int], k: int, noise_multiplier: float | None, gen: torch.Generator
) -> torch.Tensor:
    """DP-FEST's fixed rows: the top-k ids per field by count, noisy when `noise_multiplier` is set.

    One example adds 1 to one row of each of its F fields: L2 sensitivity sqrt(F), so the
    counts get N(0, (noise_multiplier * sqrt(F))^2) (one Gaussian mechanism, composed by the caller).
    """
    chosen = []
    fields = len(data.vocab_sizes)
    for f, size in enumerate(data.vocab_sizes):
        counts = torch.from_numpy(np.bincount(data.train_ids[:, f], minlength=size).astype(np.float32))
        if noise_multiplier is not None:
            counts = counts + torch.randn(size, generator=gen) * noise_multiplier * math.sqrt(fields)
        top = torch.topk(counts, min(k, size)).indices
        chosen.append(top + offsets[f])
    return torch.cat(chosen).sort().values


class _Adam:
    """Adam on the dense MLP weights (the noised gradients are dense there)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.mul_(0.9).add_(g, alpha=0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            p.sub_(self.lr * (m / (1 - 0.9**self.t)) / ((v / (1 - 0.999**self.t)).sqrt() + 1e-8))


@dataclass(frozen=True)
class RowSelection:
    """Which rows a step's embedding gradient covers, and how its sums are built (see the module docstring)."""

    method: str
    dense_buffers: bool = False
    fixed_rows: torch.Tensor | None = None  # FEST: sorted rows, the same every step
    s1: float | None = None  # AdaFEST: noise on the contribution counts
    tau: float | None = None  # AdaFEST: threshold on the noisy counts
    norm: str = "l2"  # AdaFEST: each example's contribution map scaled to L2 norm 1 or total 1
    sparse_cols: tuple[int, ...] = ()  # AdaFEST: the fields whose rows are selected per step
    dense_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # always selected


@dataclass
class PrivateGradient:
    """One step's privatized gradient: noisy sums of clipped per-example gradients (not yet scaled)."""

    mlp: list[torch.Tensor]  # same order as EmbeddingMLP.mlp_parameters
    rows: torch.Tensor | None  # sorted rows that get a gradient; None: every row (dense DP-SGD)
    table: torch.Tensor  # (len(rows), d), or (V, d) when rows is None
    touched: int  # distinct rows the batch touched (statistics only, never released)
    false_positive: int  # AdaFEST: selected rows of the sparse fields that the batch did not touch
    loss: float  # summed loss of the batch (nan for an empty batch)

    @property
    def gradient_rows(self) -> int:
        return int(self.table.shape[0])


def private_gradient(
    model: EmbeddingMLP,
    ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    clip: float,
    sigma_c: float,
    selection: RowSelection,
    gen: torch.Generator,
) -> PrivateGradient:
    """Clip every example's gradient to `clip`, sum, and add N(0, sigma_c^2) to the MLP and the selected rows.

    AdaFEST's selection noise (N(0, s1^2) on the contribution counts) is drawn here too, so one
    call is one run of each of the step's mechanisms. `sigma_c = 0` gives the noise-free sums.
    """
    vocab, dim = model.table.shape
    if len(ids):
        clipped = clipped_gradients(model, ids, labels, clip)
        mlp_sums, rows, row_grads, loss = clipped.mlp, clipped.rows, clipped.row_grads.reshape(-1, dim), clipped.loss
    else:
        mlp_sums = [torch.zeros_like(p) for p in model.mlp_parameters()]
        rows, row_grads, loss = torch.empty(0, model.fields, dtype=torch.long), torch.zeros(0, dim), float("nan")
    mlp = [s + torch.randn(s.shape, generator=gen) * sigma_c for s in mlp_sums]
    method, fp = selection.method, 0
    if method == "adafest":
        large = rows[:, list(selection.sparse_cols)]
        weight = 1.0 / (math.sqrt(large.shape[1]) if selection.norm == "l2" else large.shape[1])
    if method == "dense" or selection.dense_buffers:
        summed = torch.zeros(vocab, dim).index_add_(0, rows.flatten(), row_grads)
        touched = int((torch.bincount(rows.flatten(), minlength=vocab) > 0).sum())
        if method == "dense":  # a dense V x d gradient, noise on every row
            return PrivateGradient(mlp, None, summed.add_(torch.randn(vocab, dim, generator=gen) * sigma_c), touched, 0, loss)
        if method == "fest":
            selected = selection.fixed_rows
        else:  # a noisy count for every row: zero-count rows pass with P(N(0, s1^2) > tau), as sampled below
            counts = torch.bincount(large.flatten(), minlength=vocab).to(torch.float32) * weight
            passed = counts + torch.randn(vocab, generator=gen) * selection.s1 > selection.tau
            passed[selection.dense_rows] = False
            chosen = passed.nonzero().squeeze(1)
            fp = int((counts[chosen] == 0).sum())
            selected = torch.cat([selection.dense_rows, chosen]).sort().values
        values = summed[selected].add_(torch.randn(len(selected), dim, generator=gen) * sigma_c)
        return PrivateGradient(mlp, selected, values, touched, fp, loss)
    touched_rows, inverse = torch.unique(rows, return_inverse=True)
    summed = torch.zeros(len(touched_rows), dim).index_add_(0, inverse.flatten(), row_grads)
    if method == "fest":
        selected = selection.fixed_rows
    else:
        t_rows, passed, extra = adafest_select(
            large, vocab, selection.s1, selection.tau, selection.norm, gen, exclude=selection.dense_rows, weight=weight
        )
        fp = len(extra)
        selected = torch.cat([selection.dense_rows, t_rows[passed], extra]).sort().values  # disjoint parts
    values = torch.randn(len(selected), dim, generator=gen) * sigma_c
    if len(selected):
        pos = torch.searchsorted(selected, touched_rows).clamp(max=len(selected) - 1)
        hit = selected[pos] == touched_rows  # a touched row that was not selected contributes nothing
        values.index_add_(0, pos[hit], summed[hit])
    return PrivateGradient(mlp, selected, values, len(touched_rows), fp, loss)


def auto_delta(n_train: int) -> float:
    return AUTO_DELTA / n_train


def plan_privacy(config: DPTrainConfig, n_train: int) -> PrivacyReport:
    """Sampling rate and steps from the config, the noise solved from the target epsilon.

    Settings that would make the guarantee meaningless are refused first, all at once
    (PrivacyConfigError, optimizer/dp/validators.py), and so is a solved noise multiplier under
    validators.MIN_NOISE_MULTIPLIER.
    """
    check_privacy_config(config, n_train)
    q = min(1.0, config.batch_size / n_train)
    steps = max(1, int(math.ceil(config.epochs / q)))
    delta = config.delta if config.delta is not None else auto_delta(n_train)
    topk = config.topk_noise_multiplier if config.method == "fest" and config.fest_frequencies == "dp" else None
    sigma = solve_noise_multiplier(config.epsilon, delta, q, steps, accountant=config.accountant, topk_noise_multiplier=topk)
    problems = noise_problems(
        sigma, epsilon=config.epsilon, delta=delta, sampling_rate=q, steps=steps, accountant=config.accountant, topk_noise_multiplier=topk
    )
    if problems:
        raise PrivacyConfigError(problems)
    if config.method == "adafest":
        s1, s2 = split_noise_multiplier(sigma, config.selection_share)
    else:
        s1, s2 = None, sigma
    effective = effective_noise_multiplier(s1, s2)
    privacy = TrainingPrivacy(q, steps, effective, topk)
    return PrivacyReport(
        epsilon_target=config.epsilon,
        delta=delta,
        accountant=config.accountant,
        sampling_rate=q,
        steps=steps,
        noise_multiplier_effective=effective,
        noise_multiplier_gradient=s2,
        noise_multiplier_selection=s1,
        topk_noise_multiplier=topk,
        epsilon_rdp=compute_epsilon(privacy, delta, "rdp"),
        epsilon_pld=compute_epsilon(privacy, delta, "pld"),
    )


def register_mechanisms(ledger: PrivacyLedger, privacy: PrivacyReport, clip: float, fields: int) -> list[str]:
    """Declare the run's mechanisms in `ledger`; returns the names recorded once per step."""
    if privacy.topk_noise_multiplier is not None:
        ledger.register(
            MECH_TOPK,
            noise_multiplier=privacy.topk_noise_multiplier,
            l2_sensitivity=math.sqrt(fields),
            releases="noisy id counts of every field over all training examples (one per field per example)",
        )
    per_step = []
    if privacy.noise_multiplier_selection is not None:
        ledger.register(
            MECH_SELECTION,
            noise_multiplier=privacy.noise_multiplier_selection,
            l2_sensitivity=1.0,
            sampling_rate=privacy.sampling_rate,
            batch=STEP_BATCH,
            releases="the rows whose noisy contribution count (each example's map of L2 norm <= 1) passes tau",
        )
        per_step.append(MECH_SELECTION)
    ledger.register(
        MECH_GRADIENT,
        noise_multiplier=privacy.noise_multiplier_gradient,
        l2_sensitivity=clip,
        sampling_rate=privacy.sampling_rate,
        batch=STEP_BATCH,
        releases="the noisy sum of clipped per-example gradients: every MLP weight and the selected rows",
    )
    return per_step + [MECH_GRADIENT]


def uses_dense_buffers(config: DPTrainConfig, vocab: int, expected_batch: float, fields: int) -> bool:
    """Whether a step builds its sums in a V x d buffer (the module docstring says when and why)."""
    if config.buffers != "auto":
        return config.buffers == "dense"
    return vocab <= expected_batch * fields


def sparsity_note(config: DPTrainConfig, vocab: int, n_train: int, fields: int) -> str | None:
    """A sentence for the user when FEST/AdaFEST cannot save training time on this table (public sizes only)."""
    if config.method == "dense":
        return None
    lookups = min(1.0, config.batch_size / n_train) * n_train * fields
    if vocab > lookups:
        return None
    return (
        f"sparsity does not pay in training time here: the table has {vocab} rows, no more than the "
        f"{lookups:.0f} row lookups of one expected batch ({config.batch_size} x {fields} fields), so a dense "
        "noise step costs about as much as a sparse one. What it still buys is a smaller deployed table (rows "
        "never selected are dropped, and the private lookup's bytes grow with the rows); for speed alone, "
        "--selection dense is as fast"
    )


class SteppedRun:
    """A run made of `run_steps` calls to `step()` and one to `finish(train_s)` (DPTrainer, OpacusTrainer)."""

    run_steps: int

    def step(self) -> dict:
        raise NotImplementedError

    def finish(self, train_s: float) -> DPTrainResult:
        raise NotImplementedError

    def run(self, progress: Callable[[int, int, dict], None] | None = None) -> DPTrainResult:
        start = time.perf_counter()
        for step in range(self.run_steps):
            info = self.step()
            if progress is not None:
                progress(step + 1, self.run_steps, info)
        return self.finish(time.perf_counter() - start)


class DPTrainer(SteppedRun):
    """One twinfer run, a step at a time: `train_dp` runs it to the end; benchmarks interleave several.

    `privacy` defaults to plan_privacy(config) (validated); one given explicitly is used as is.
    Every mechanism is recorded in `ledger` (a fresh one unless given: pass your own to keep
    the record of a run that is interrupted) as soon as it has run.
    """

    name: str | None = None

    def __init__(
        self, data: CategoricalData, config: DPTrainConfig, *, privacy: PrivacyReport | None = None, ledger: PrivacyLedger | None = None
    ) -> None:
        torch.manual_seed(config.seed)
        self.data, self.config = data, config
        self.gen = gen = torch.Generator().manual_seed(config.seed + 1)
        self.privacy = privacy = privacy or plan_privacy(config, len(data.train_ids))
        self.ledger = ledger = ledger if ledger is not None else PrivacyLedger()
        self.per_step = register_mechanisms(ledger, privacy, config.clip, len(data.vocab_sizes))
        self.model = model = EmbeddingMLP(data.vocab_sizes, config.dim, config.hidden, seed=config.seed)
        vocab = int(model.table.shape[0])
        offsets = model.offsets.tolist()
        self.ids_all = torch.from_numpy(data.train_ids)
        self.labels_all = torch.from_numpy(data.train_labels)
        self.expected_batch = privacy.sampling_rate * len(self.ids_all)
        self.stats = StepStats()
        self.updated = torch.zeros(vocab, dtype=torch.bool)
        self.run_steps = min(privacy.steps, config.max_steps) if config.max_steps else privacy.steps
        self._setup(data, config, privacy, vocab, offsets, gen)

    def _setup(self, data, config, privacy, vocab, offsets, gen) -> None:
        small = [f for f, v in enumerate(data.vocab_sizes) if v <= config.dense_fields_max_vocab]
        sparse_cols = tuple(f for f in range(len(data.vocab_sizes)) if f not in small)
        dense_rows = torch.cat(
            [torch.arange(offsets[f], offsets[f] + data.vocab_sizes[f]) for f in small] or [torch.empty(0, dtype=torch.long)]
        )
        if config.method == "adafest" and not sparse_cols:
            raise ValueError(
                f"every field has at most {config.dense_fields_max_vocab} ids, so AdaFEST would select nothing; "
                "lower dense_fields_max_vocab or use dense DP-SGD"
            )
        fest_rows = None
        if config.method == "fest":
            noise = privacy.topk_noise_multiplier if config.fest_frequencies == "dp" else None
            top = dp_topk_rows(data, offsets, config.fest_topk, noise, gen)
            if noise is not None:
                self.ledger.record(MECH_TOPK)
            fest_rows = torch.unique(torch.cat([top, dense_rows]))
        s1 = privacy.noise_multiplier_selection
        self.selection = RowSelection(
            method=config.method,
            dense_buffers=uses_dense_buffers(config, vocab, self.expected_batch, len(data.vocab_sizes)),
            fixed_rows=fest_rows,
            s1=s1,
            tau=config.threshold_sigmas * s1 if s1 is not None else None,
            norm=config.contribution_norm,
            sparse_cols=sparse_cols,
            dense_rows=dense_rows,
        )
        self.adam = _Adam(self.model.mlp_parameters(), config.lr_mlp)
        self.sigma_c = privacy.noise_multiplier_gradient * config.clip
        self.lr_rows = config.lr_embedding / self.expected_batch

    def step(self) -> dict:
        """One step (timed into `stats`); returns {"loss", "rows"} for progress displays."""
        t0 = time.perf_counter()
        batch = (torch.rand(len(self.ids_all), generator=self.gen) < self.privacy.sampling_rate).nonzero().squeeze(1)
        grad = private_gradient(
            self.model,
            self.ids_all[batch],
            self.labels_all[batch],
            clip=self.config.clip,
            sigma_c=self.sigma_c,
            selection=self.selection,
            gen=self.gen,
        )
        self.ledger.record(*self.per_step)
        self.adam.step([g / self.expected_batch for g in grad.mlp])
        with torch.no_grad():
            if grad.rows is None:
                self.model.table.sub_(grad.table, alpha=self.lr_rows)
                self.updated[:] = True
            else:
                self.model.table.index_add_(0, grad.rows, grad.table, alpha=-self.lr_rows)
                self.updated[grad.rows] = True
        stats = self.stats
        stats.seconds.append(time.perf_counter() - t0)
        stats.batch_sizes.append(len(batch))
        stats.gradient_rows.append(grad.gradient_rows)
        stats.true_rows.append(grad.touched)
        stats.false_positive_rows.append(grad.false_positive)
        return {"loss": grad.loss / max(1, len(batch)), "rows": grad.gradient_rows}

    def finish(self, train_s: float) -> DPTrainResult:
        """Test AUC, and what the ledger says was spent."""
        test_auc = auc(predict(self.model, self.data.test_ids), self.data.test_labels)
        spent = self.ledger.to_dict(self.privacy.delta)
        return DPTrainResult(
            self.model, self.config, self.privacy, self.stats, self.updated, test_auc, train_s, self.ledger, spent, name=self.name
        )


def train_dp(
    data: CategoricalData,
    config: DPTrainConfig,
    *,
    privacy: PrivacyReport | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    ledger: PrivacyLedger | None = None,
) -> DPTrainResult:
    """Train an EmbeddingMLP on `data` with the configured method; evaluates test AUC.

    `privacy` and `ledger` as for DPTrainer; the result's `spent` is computed from the ledger,
    so a run cut short by `config.max_steps` reports what its steps spent.
    """
    return DPTrainer(data, config, privacy=privacy, ledger=ledger).run(progress)


def write_dp_artifact(out_dir, result: DPTrainResult, data: CategoricalData) -> Path:
    """Drop the never-updated rows, export ONNX, and write the artifact with its privacy manifest.

    The safetensors file carries the public id -> row map of every field ("id_to_row/<field>"),
    which a client needs to turn raw ids into the model's input (DeployedEmbedding.encode).
    """
    from twinfer.optimizer.common.artifact import write_artifact
    from twinfer.optimizer.dp.embedding_model import deploy_rows, export_onnx

    deployed = deploy_rows(result.model, result.updated)
    p, spent = result.privacy, result.spent
    manifest = {
        "kind": "dp-embedding-mlp",
        "dataset": data.name,
        "dataset_generated": data.generated,
        "fields": data.fields,
        "vocab_sizes": data.vocab_sizes,
        "selection": result.config.method,
        # What the run spent, from its ledger (by the configured accountant, then both).
        "epsilon": spent["epsilon_rdp"] if p.accountant == "rdp" else spent["epsilon_pld"],
        "epsilon_rdp": spent["epsilon_rdp"],
        "epsilon_pld": spent["epsilon_pld"],
        "delta": p.delta,
        "accountant": p.accountant,
        "steps_run": spent["steps_run"],
        "noise_multiplier_effective": p.noise_multiplier_effective,
        "privacy": asdict(p),  # the plan: noise solved for p.steps steps
        "privacy_ledger": spent,
        "clip": result.config.clip,
        "rows_kept": dict(zip(data.fields, deployed.kept_per_field)),
        "rows_dropped": dict(zip(data.fields, deployed.dropped_per_field)),
        "deployed_table_rows": deployed.rows,
        "test_auc": result.test_auc,
        "input": "int64 rows (N x F) of the deployed table; map raw ids with the id_to_row/<field> tensors "
        f"(dropped ids map to the zero row {deployed.rows - 1})",
    }
    tensors = {f"{ID_MAP_PREFIX}{name}": mapping for name, mapping in zip(data.fields, deployed.row_of)}
    return write_artifact(out_dir, export_onnx(result.model, deployed), manifest, tensors)


def encode_for_artifact(out_dir: str | Path, ids: np.ndarray) -> np.ndarray:
    """Raw field-local ids (N x F) -> the artifact's input rows, with its public id -> row maps."""
    artifact = Artifact.read(out_dir)
    fields, maps = artifact.manifest["fields"], artifact.tensors()
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != len(fields):
        raise ValueError(f"ids must be N x {len(fields)} ({', '.join(fields)}), got shape {ids.shape}")
    columns = []
    for f, name in enumerate(fields):
        mapping = maps[f"{ID_MAP_PREFIX}{name}"]
        if ids[:, f].min() < 0 or ids[:, f].max() >= len(mapping):
            raise ValueError(f"field '{name}': ids must lie in [0, {len(mapping)}), got {ids[:, f].min()}..{ids[:, f].max()}")
        columns.append(mapping[ids[:, f]])
    return np.stack(columns, 1)
