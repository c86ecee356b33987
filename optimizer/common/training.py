"""The optimizer's one training loop and its one accuracy metric.

`train_loop` runs seeded, shuffled mini-batches: every epoch draws a fresh permutation of the
training rows from a private generator seeded by `seed` (so shuffling never depends on global
RNG state) and walks it in `batch_size` slices, the last one possibly shorter. One step is
forward, `loss_fn`, backward, optional gradient-norm clipping, the optimizer's step and the
scheduler's step. What the methods add around that comes in through hooks:

- `before_step(done)`: before each step, with the number of steps already taken (AutoReP
  freezes its masks and switches the DaPa refit there);
- `loss_fn(logits, x, y)`: the batch's loss (cross-entropy unless given; AutoReP adds
  distillation and its budget hinge);
- `after_step(step)`: after each step, with a `Step` (pruning re-applies its masks there,
  AutoReP evaluates and keeps checkpoints, progress bars show a postfix);
- `after_epoch(epoch)`: after each full epoch; returning True stops training (early stopping).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

ArrayLike = np.ndarray | torch.Tensor
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """The step just taken, as `after_step` sees it."""

    step: int  # steps taken so far, this one included
    epoch: int  # the (1-based) epoch this batch belongs to
    index: torch.Tensor  # the batch's rows of the training data
    logits: torch.Tensor
    loss: torch.Tensor
    bar: tqdm  # the progress bar this step counts on (a disabled one without progress)


def cross_entropy(logits: torch.Tensor, _x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def train_loop(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    seed: int,
    epochs: int | None = None,
    steps: int | None = None,
    loss_fn: LossFn = cross_entropy,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    clip_norm: float | None = None,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[Step], None] | None = None,
    after_epoch: Callable[[int], bool] | None = None,
    progress: bool = False,
    bar: Literal["run", "epoch"] = "run",
    desc: str = "train",
) -> int:
    """Train `model` in train mode for `epochs` epochs or `steps` steps (exactly one of them).

    `clip_norm` clips the gradient norm of the optimizer's parameters before each step.
    Progress is one bar for the run (`bar="run"`, described by `desc`) or one per epoch
    ("epoch i/N"). Returns the number of the last epoch that ran (0 when nothing ran).
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_epoch = -(-len(x) // batch_size)
    total = steps if steps is not None else epochs * per_epoch
    if total > 0 and per_epoch == 0:
        raise ValueError("there are no training examples")
    n_epochs = epochs if epochs is not None else -(-total // per_epoch) if per_epoch else 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(seed)
    run_bar = tqdm(total=total, desc=desc, disable=not progress) if bar == "run" else None
    done = epoch = 0
    try:
        while done < total:
            epoch += 1
            order = torch.randperm(len(x), generator=generator)
            epoch_bar = run_bar or tqdm(total=per_epoch, desc=f"epoch {epoch}/{n_epochs}", disable=not progress, leave=True)
            for start in range(0, len(x), batch_size):
                if done >= total:
                    break
                if before_step is not None:
                    before_step(done)
                idx = order[start : start + batch_size]
                xb, yb = x[idx], y[idx]
                model.train()
                logits = model(xb)
                loss = loss_fn(logits, xb, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip_norm)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                done += 1
                epoch_bar.update(1)
                if after_step is not None:
                    after_step(Step(done, epoch, idx, logits, loss, epoch_bar))
            if epoch_bar is not run_bar:
                epoch_bar.close()
            if done % per_epoch == 0 and after_epoch is not None and after_epoch(epoch):
                break
    finally:
        if run_bar is not None:
            run_bar.close()
    return epoch


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy in eval mode; restores the model's previous train/eval mode."""
    x, y = as_tensors(images, labels)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        # Chunks bound peak memory on the 10k test split.
        for start in range(0, len(x), 1000):
            chunk = slice(start, start + 1000)
            correct += int((model(x[chunk]).argmax(1) == y[chunk]).sum())
    finally:
        model.train(was_training)
    return correct / max(len(x), 1)


def as_tensors(images: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert image/label arrays to float32 and int64 tensors of matching length."""
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    return x, y
