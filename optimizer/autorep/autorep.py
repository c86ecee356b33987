"""AutoReP: fine-tune a model so that at most `relu_budget` activation elements keep a ReLU.

Every nn.ReLU becomes its own MaskedReLU site. The loss is cross-entropy, knowledge
distillation from the original model (T = 4) and a hinge on the kept fraction:

    loss = CE + kd_weight * T^2 * KL(student_T || teacher_T) + penalty * relu(kept / total - budget / total)

Two phases share the step budget: a mask search (masks, weights and polynomials train) and a
fine-tune with the masks frozen. A checkpoint is kept only while the live ReLU count is within
the budget; the best one on held-out data is returned. Baselines use the same procedure at
other granularities: "channel" (whole channels kept or replaced, SENet-style) and
"polynomial" (every ReLU replaced).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twinfer.optimizer.autorep.masked_relu import MaskedReLU
from twinfer.optimizer.common.hooks import run_hooked
from twinfer.optimizer.common.training import Step, evaluate_accuracy, train_loop

Granularity = Literal["element", "channel", "polynomial"]
_log = logging.getLogger(__name__)


class BudgetError(ValueError):
    """The ReLU budget is impossible for this model, or training could not reach it."""


@dataclass
class AutoRepConfig:
    relu_budget: int
    granularity: Granularity = "element"
    epochs: float = 2.0
    search_fraction: float = 0.6  # share of the steps spent searching masks; the rest fine-tunes
    batch_size: int = 128
    lr: float = 1e-3
    aux_lr: float | None = None  # default: aux can travel from +1 to -1 within the search steps
    penalty: float = 10.0
    kd_temperature: float = 4.0
    kd_weight: float = 1.0
    threshold: float = 0.002
    refit_steps: int = 50  # DaPa refits from running statistics for these first steps
    c2_max: float = 1.0
    evals_per_epoch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.relu_budget < 0:
            raise BudgetError(f"the ReLU budget must be >= 0, got {self.relu_budget}")
        if self.granularity not in ("element", "channel", "polynomial"):
            raise ValueError(f"granularity must be element, channel or polynomial, got {self.granularity!r}")
        if self.epochs <= 0 or not 0 < self.search_fraction <= 1:
            raise ValueError("epochs must be > 0 and search_fraction in (0, 1]")


@dataclass
class AutoRepResult:
    model: nn.Module
    relu_count: int
    relu_total: int
    val_accuracy: float
    history: list[dict] = field(default_factory=list)


def sites(model: nn.Module) -> list[MaskedReLU]:
    return [m for m in model.modules() if isinstance(m, MaskedReLU)]


def relu_sites_model(model: nn.Module, example: torch.Tensor, config: AutoRepConfig) -> nn.Module:
    """A copy of `model` with each nn.ReLU replaced by its own MaskedReLU, materialized."""
    student = copy.deepcopy(model)
    calls: dict[int, int] = {}
    relus = [m for m in student.modules() if isinstance(m, nn.ReLU)]
    run_hooked(student.eval(), example, relus, lambda mod, *_: calls.__setitem__(id(mod), calls.get(id(mod), 0) + 1))
    shared = [c for c in calls.values() if c > 1]
    if shared:
        raise ValueError("an nn.ReLU instance is called at several sites; give each site its own module")
    _replace_relus(student, config)
    if not sites(student):
        raise BudgetError("the model has no nn.ReLU module, so there is nothing to optimize")
    with torch.no_grad():
        student.eval()(example)  # materialize masks for each site's activation shape
    return student


def _replace_relus(module: nn.Module, config: AutoRepConfig) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, MaskedReLU(threshold=config.threshold, c2_max=config.c2_max, granularity=_site_granularity(config)))
        else:
            _replace_relus(child, config)


def _site_granularity(config: AutoRepConfig) -> str:
    return "channel" if config.granularity == "channel" else "element"


def relu_count(model: nn.Module) -> int:
    return sum(s.kept() for s in sites(model))


def relu_total(model: nn.Module) -> int:
    return sum(s.elements() for s in sites(model))


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1), reduction="batchmean") * temperature**2


def budget_hinge(model: nn.Module, budget: int) -> torch.Tensor:
    """relu(kept/total - budget/total), differentiable in the masks' aux through the STE."""
    total = relu_total(model)
    kept = sum(s.density_term() for s in sites(model))
    return F.relu(kept / total - budget / total)


def _penalty(base: float, step: int, search_steps: int) -> float:
    """The hinge weight: constant for the first half of the search, then doubling every tenth.

    Our searches are a few hundred steps, not AutoReP's 200 epochs; positions whose loss
    gradient resists a constant weight would otherwise keep the count above the budget.
    """
    late = (step - search_steps / 2) / max(search_steps / 10, 1)
    return base * 2.0 ** max(0.0, late)


def _freeze_masks(model: nn.Module, frozen: bool) -> None:
    for s in sites(model):
        s.frozen = frozen or s.polynomial_only
        s.aux.requires_grad_(not s.frozen)


def optimize_relus(
    teacher: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    config: AutoRepConfig,
    progress: bool = True,
    distill_from: nn.Module | None = None,
    polynomial_sites: tuple[str, ...] = (),
) -> AutoRepResult:
    """Fine-tune a masked copy of `teacher` to the ReLU budget; the best in-budget checkpoint.

    `distill_from`: the model the distillation targets come from, when not `teacher` itself
    (a structure changed before the masks are learned still learns from the original model).
    `polynomial_sites`: names of nn.ReLU modules of `teacher` that become polynomials everywhere
    (their masks zero and frozen): a whole site without a comparison saves its rounds.
    """
    torch.manual_seed(config.seed)
    x, y = torch.as_tensor(train[0], dtype=torch.float32), torch.as_tensor(train[1], dtype=torch.int64)
    xv, yv = torch.as_tensor(val[0], dtype=torch.float32), torch.as_tensor(val[1], dtype=torch.int64)
    student = relu_sites_model(teacher.eval(), x[:2], config)
    teacher = (distill_from if distill_from is not None else teacher).eval()
    total = relu_total(student)
    if config.relu_budget > total:
        _log.warning("budget %d exceeds the model's %d ReLUs; nothing has to be replaced", config.relu_budget, total)
    unknown = sorted(set(polynomial_sites) - {n for n, m in student.named_modules() if isinstance(m, MaskedReLU)})
    if unknown:
        raise ValueError(f"polynomial_sites name no ReLU module of the model: {unknown}")
    for name, s in student.named_modules():
        if isinstance(s, MaskedReLU) and (config.granularity == "polynomial" or name in polynomial_sites):
            s.mask.zero_()
            s.polynomial_only = True
    steps_per_epoch = (len(x) + config.batch_size - 1) // config.batch_size
    steps = max(1, int(round(config.epochs * steps_per_epoch)))
    search_steps = int(steps * config.search_fraction) if config.granularity != "polynomial" else 0
    site_params = [s.aux for s in sites(student)]
    ids = {id(p) for p in site_params}
    optimizer = torch.optim.Adam(
        [
            {"params": [p for p in student.parameters() if id(p) not in ids], "lr": config.lr},
            {"params": site_params, "lr": config.aux_lr or 2.0 / max(search_steps, 1)},
        ]
    )
    eval_every = max(1, steps_per_epoch // config.evals_per_epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    _freeze_masks(student, config.granularity == "polynomial")
    best: tuple[float, dict] | None = None
    history: list[dict] = []
    searching = search_steps > 0
    current = 0  # the step being taken (0-based): the hinge weight grows with it

    def before_step(step: int) -> None:
        nonlocal searching, current
        current = step
        if searching and (step >= search_steps or relu_count(student) <= config.relu_budget):
            # Fine-tune phase: the mask is fixed from the first step it fits the budget, so the
            # optimizer's momentum cannot carry it further down than needed.
            _freeze_masks(student, True)
            searching = False
        for s in sites(student):
            s.refit = step < config.refit_steps

    def loss_fn(logits: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(xb)
        loss = F.cross_entropy(logits, yb) + config.kd_weight * _kd_loss(logits, target, config.kd_temperature)
        if searching:
            loss = loss + _penalty(config.penalty, current, search_steps) * budget_hinge(student, config.relu_budget)
        return loss

    def after_step(done: Step) -> None:
        nonlocal best
        count = relu_count(student)
        epoch = f"{done.step / steps_per_epoch:.2f}"
        loss = done.loss.item()
        done.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", relus=count)
        if done.step % eval_every == 0 or done.step == steps:
            acc = evaluate_accuracy(student, xv, yv)
            history.append(
                {"step": done.step, "epoch": done.step / steps_per_epoch, "loss": loss, "val_accuracy": acc, "relu_count": count, "searching": searching}
            )
            done.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", val_acc=f"{acc:.3f}", relus=count)
            # Only fine-tune-phase checkpoints count: their mask is final, and within budget.
            if count <= config.relu_budget and not searching and (best is None or acc > best[0]):
                best = (acc, copy.deepcopy(student.state_dict()))

    train_loop(
        student,
        x,
        y,
        optimizer,
        batch_size=config.batch_size,
        seed=config.seed,
        steps=steps,
        loss_fn=loss_fn,
        scheduler=scheduler,
        before_step=before_step,
        after_step=after_step,
        progress=progress,
        desc=f"autorep {config.granularity} budget {config.relu_budget}",
    )
    if best is None:
        raise BudgetError(
            f"the budget of {config.relu_budget} ReLUs was not met: the mask search ended at {relu_count(student)} of {total}; "
            "raise --penalty or --epochs"
        )
    student.load_state_dict(best[1])
    student.eval()
    return AutoRepResult(model=student, relu_count=relu_count(student), relu_total=total, val_accuracy=best[0], history=history)


def config_dict(config: AutoRepConfig) -> dict:
    return asdict(config)
