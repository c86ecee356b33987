"""Opacus as the dense DP-SGD baseline: twinfer's embedding model trained through opacus.PrivacyEngine.

The same as `train_dp(method="dense")`: the model (EmbeddingMLP's function and initial weights,
in layers Opacus supports: nn.Embedding and nn.Linear), Poisson sampling at the planned rate
(Opacus's own DPDataLoader), the clipping norm, the noise multiplier that plan_privacy solves
for the same epsilon and delta, and the update (SGD on the table at lr_embedding / expected
batch, Adam on the MLP with the noisy sum / expected batch). Opacus's own: per-example norms
and clipping, dense noise N(0, (s C)^2) on every parameter, the optimizer wrapper. Two of its
modes:

- "ghost" (fast gradient clipping, the default here): per-example norms from its exact norm
  sampler for nn.Embedding (no per-example gradient), then a second backward pass on the
  clip-weighted loss; the gradient and its noise are dense V x d.
- "hooks" (its classic mode): per-example gradients, for nn.Embedding a B x V x d tensor,
  so only small tables fit.

Two details keep the comparison exact. `make_private(poisson_sampling=True)` would rebuild the
loader with rate 1 / len(loader), which is not the planned rate unless 1/q is a whole number,
so the DPDataLoader is built at the planned rate and handed over as it is (poisson_sampling=False
then only means "do not rebuild it"). And a batch is fetched with one indexing
(`__getitems__`), as train_dp does, so a per-example Python loop in the data loader is not what
the step time measures. Opacus's own accountant is not used for the result (its hook takes the
rate from len(loader)); `opacus_epsilons` gives its RDP and PRV figures for the same history
as a cross-check of the ledger.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import Dataset

from twinfer.optimizer.data.dp_data import CategoricalData
from twinfer.optimizer.dp.embedding_model import EmbeddingMLP, auc, predict
from twinfer.optimizer.dp.ledger import PrivacyLedger
from twinfer.optimizer.dp.sparse_training import (
    DPTrainConfig,
    DPTrainResult,
    PrivacyReport,
    SteppedRun,
    StepStats,
    plan_privacy,
    register_mechanisms,
)

OPACUS_VERSION = "1.6.0"  # the pin in pyproject.toml's test and bench extras
GRAD_SAMPLE_MODES = ("ghost", "hooks")
_INSTALL_HINT = f"Opacus is a test and benchmark dependency: pip install -e '.[bench]' (or pip install opacus=={OPACUS_VERSION})"


# Opacus warnings that say nothing here: secure_mode is off on purpose (a benchmark, not a
# release), and its backward hooks fire on the module outputs because ids need no gradient.
_EXPECTED_WARNINGS = ("Secure RNG turned off", "Full backward hook is firing")


@contextlib.contextmanager
def _expected_warnings_quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for text in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=text)
        yield


def _opacus():
    try:
        import opacus
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(_INSTALL_HINT) from err
    return opacus


class OpacusEmbeddingMLP(nn.Module):
    """EmbeddingMLP's function in layers Opacus knows, starting from that model's weights."""

    def __init__(self, model: EmbeddingMLP) -> None:
        super().__init__()
        vocab, dim = model.table.shape
        hidden, fan_in = model.w1.shape
        self.embedding = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(fan_in, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.register_buffer("offsets", model.offsets.clone())
        with torch.no_grad():
            for mine, theirs in zip(self.twin_parameters(), [model.table, *model.mlp_parameters()]):
                mine.copy_(theirs)

    def twin_parameters(self) -> list[nn.Parameter]:
        """In the order [table, *EmbeddingMLP.mlp_parameters()]."""
        return [self.embedding.weight, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids + self.offsets).flatten(1)
        return self.fc2(torch.relu(self.fc1(x))).squeeze(-1)

    @torch.no_grad()
    def copy_into(self, model: EmbeddingMLP) -> EmbeddingMLP:
        for theirs, mine in zip([model.table, *model.mlp_parameters()], self.twin_parameters()):
            theirs.copy_(mine)
        return model


class SgdAdam(torch.optim.Optimizer):
    """train_dp's update as one torch optimizer: SGD on the table, Adam on the MLP.

    Gradients arrive as noisy sums and are multiplied by `grad_scale` (1 / expected batch) first.
    """

    def __init__(self, table: nn.Parameter, mlp: list[nn.Parameter], *, lr_table: float, lr_mlp: float, grad_scale: float) -> None:
        super().__init__(
            [{"params": [table], "lr": lr_table, "rule": "sgd"}, {"params": list(mlp), "lr": lr_mlp, "rule": "adam"}],
            {"grad_scale": grad_scale},
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad * group["grad_scale"]
                if group["rule"] == "sgd":
                    p.sub_(g, alpha=group["lr"])
                    continue
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                t, m, v = state["t"], state["m"], state["v"]
                m.mul_(0.9).add_(g, alpha=0.1)
                v.mul_(0.999).addcmul_(g, g, value=0.001)
                p.sub_(group["lr"] * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8))
        return None


class _Examples(Dataset):
    """(ids, label) pairs, fetched a whole batch at a time."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.ids[index], self.labels[index]


def _as_batch(batch):
    return batch  # __getitems__ already returned (ids, labels)


def make_private(
    model: EmbeddingMLP,
    ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    sampling_rate: float,
    noise_multiplier: float,
    clip: float,
    lr_embedding: float,
    lr_mlp: float,
    expected_batch: float,
    grad_sample_mode: str = "ghost",
    generator: torch.Generator | None = None,
):
    """(module, optimizer, criterion, loader) from opacus.PrivacyEngine.make_private for `model`'s twin."""
    opacus = _opacus()
    from opacus.data_loader import DPDataLoader

    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    twin = OpacusEmbeddingMLP(model)
    table, *mlp = twin.twin_parameters()
    optimizer = SgdAdam(table, mlp, lr_table=lr_embedding, lr_mlp=lr_mlp, grad_scale=1.0 / expected_batch)
    loader = DPDataLoader(_Examples(ids, labels), sample_rate=sampling_rate, generator=generator, collate_fn=_as_batch)
    criterion = nn.BCEWithLogitsLoss(reduction="sum")
    with _expected_warnings_quiet():
        engine = opacus.PrivacyEngine(accountant="rdp")
        made = engine.make_private(
            module=twin,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip,
            poisson_sampling=False,  # the loader above already samples at exactly `sampling_rate`
            loss_reduction="sum",
            grad_sample_mode=grad_sample_mode,
            noise_generator=generator,
        )
    if grad_sample_mode == "ghost":
        module, dp_optimizer, dp_criterion, dp_loader = made
    else:
        (module, dp_optimizer, dp_loader), dp_criterion = made, criterion
    return module, dp_optimizer, dp_criterion, dp_loader


def opacus_step(module, optimizer, criterion, ids: torch.Tensor, labels: torch.Tensor) -> None:
    """One Opacus DP-SGD step on a batch: per-example clipping, dense noise, the optimizer's update."""
    with _expected_warnings_quiet():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(module(ids), labels)
        loss.backward()
        optimizer.step()


class OpacusTrainer(SteppedRun):
    """Dense DP-SGD through Opacus with train_dp's model, plan and update, a step at a time (labelled "opacus")."""

    name = "opacus"

    def __init__(
        self,
        data: CategoricalData,
        config: DPTrainConfig,
        *,
        privacy: PrivacyReport | None = None,
        grad_sample_mode: str = "ghost",
        ledger: PrivacyLedger | None = None,
    ) -> None:
        self.data = data
        self.config = config = replace(config, method="dense")
        torch.manual_seed(config.seed)
        gen = torch.Generator().manual_seed(config.seed + 1)
        self.privacy = privacy = privacy or plan_privacy(config, len(data.train_ids))
        self.ledger = ledger if ledger is not None else PrivacyLedger()
        self.per_step = register_mechanisms(self.ledger, privacy, config.clip, len(data.vocab_sizes))
        self.model = EmbeddingMLP(data.vocab_sizes, config.dim, config.hidden, seed=config.seed)
        ids_all, labels_all = torch.from_numpy(data.train_ids), torch.from_numpy(data.train_labels)
        self.module, self.optimizer, self.criterion, self.loader = make_private(
            self.model,
            ids_all,
            labels_all,
            sampling_rate=privacy.sampling_rate,
            noise_multiplier=privacy.noise_multiplier_gradient,
            clip=config.clip,
            lr_embedding=config.lr_embedding,
            lr_mlp=config.lr_mlp,
            expected_batch=privacy.sampling_rate * len(ids_all),
            grad_sample_mode=grad_sample_mode,
            generator=gen,
        )
        self.vocab = int(self.model.table.shape[0])
        self.run_steps = min(privacy.steps, config.max_steps) if config.max_steps else privacy.steps
        self.stats = StepStats()
        self._batches = iter(self.loader)

    def step(self) -> dict:
        t0 = time.perf_counter()
        try:
            ids, labels = next(self._batches)
        except StopIteration:  # the loader's "epoch" is int(1/q) batches; keep sampling
            self._batches = iter(self.loader)
            ids, labels = next(self._batches)
        opacus_step(self.module, self.optimizer, self.criterion, ids, labels)
        self.ledger.record(*self.per_step)
        stats = self.stats
        stats.seconds.append(time.perf_counter() - t0)
        stats.batch_sizes.append(len(ids))
        stats.gradient_rows.append(self.vocab)  # Opacus's embedding gradient and noise are dense
        stats.true_rows.append(int(torch.unique(self.model.rows(ids)).numel()))  # after the clock stopped
        stats.false_positive_rows.append(0)
        return {"loss": float("nan"), "rows": self.vocab}

    def finish(self, train_s: float) -> DPTrainResult:
        getattr(self.module, "_module", self.module).copy_into(self.model)
        test_auc = auc(predict(self.model, self.data.test_ids), self.data.test_labels)
        updated = torch.ones(self.vocab, dtype=torch.bool)
        spent = self.ledger.to_dict(self.privacy.delta)
        return DPTrainResult(self.model, self.config, self.privacy, self.stats, updated, test_auc, train_s, self.ledger, spent, name=self.name)


def train_opacus(
    data: CategoricalData,
    config: DPTrainConfig,
    *,
    privacy: PrivacyReport | None = None,
    grad_sample_mode: str = "ghost",
    ledger: PrivacyLedger | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> DPTrainResult:
    """Dense DP-SGD through Opacus with train_dp's model, plan and update; the result is labelled "opacus"."""
    return OpacusTrainer(data, config, privacy=privacy, grad_sample_mode=grad_sample_mode, ledger=ledger).run(progress)


def opacus_epsilons(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> dict[str, float]:
    """Opacus's own accountants (RDP and PRV) on the history (noise, rate, steps): a cross-check of the ledger."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    out = {}
    for name, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        acc = cls()
        acc.history = [(noise_multiplier, sampling_rate, steps)]
        out[name] = float(acc.get_epsilon(delta))
    return out
