"""MOFHEI step 1: HE/2PC-friendly conversion (MaxPool -> AvgPool, activations -> learnable polynomials).

MOFHEI (arXiv 2412.07954) replaces one layer at a time, from the last to the first: the
replaced layer and everything after it train while everything before it stays frozen; then
the whole model is fine-tuned at a lower rate. Each stage stops early on validation accuracy
and restores its best weights. Under 2PC average pooling is local and a degree-2 polynomial
costs one Beaver square per element instead of a 9-round comparison.

A `PolyAct` is an activation site (optimizer/common/artifact.py) whose mask is all zeros: it
exports as a Relu node plus public coefficients, and runs as protocols/ops/activation.py's
polynomial branch.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twinfer.optimizer.common.hooks import run_hooked
from twinfer.optimizer.common.training import evaluate_accuracy, train_loop
from twinfer.optimizer.common.validation import validation_split
from twinfer.protocols.ops.activation import ActivationSite

_log = logging.getLogger(__name__)

CONVERSIONS = ("he-friendly",)


class ConversionError(ValueError):
    """The model has a layer the conversion cannot handle, or the request is malformed."""


class PolyAct(nn.Module):
    """Learnable c0 + c1 x + c2 x^2, one coefficient triple per layer (MOFHEI's activation)."""

    def __init__(self, coeffs: tuple[float, float, float] = (0.0, 0.5, 0.1)) -> None:
        super().__init__()
        self.coeffs = nn.Parameter(torch.tensor(coeffs, dtype=torch.float32))
        self.export_as_relu = False
        self.shape: tuple[int, ...] | None = None

    @classmethod
    def fit_relu(cls, scale: float) -> "PolyAct":
        """Least-squares fit of ReLU on [-scale, scale]: 3a/32 + x/2 + 15 x^2 / (32 a)."""
        a = max(float(scale), 1e-3)
        return cls((3 * a / 32, 0.5, 15 / (32 * a)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shape = tuple(x.shape[1:])
        if self.export_as_relu:
            return F.relu(x)
        c = self.coeffs
        return c[0] + c[1] * x + c[2] * x * x

    def site(self) -> ActivationSite:
        """No ReLU kept anywhere: the whole activation is the polynomial."""
        if self.shape is None:
            raise ConversionError("PolyAct has not seen an input yet; run one forward pass before export")
        coeffs = self.coeffs.detach().cpu().numpy().astype(np.float32).reshape(1, 3)
        return ActivationSite(mask=np.zeros(self.shape, dtype=bool), coeffs=coeffs)

    def extra_repr(self) -> str:
        c = self.coeffs.detach().tolist()
        return f"{c[0]:.4g} + {c[1]:.4g} x + {c[2]:.4g} x^2"


@dataclass
class Split:
    """Training data for the optimizer: a training part and a validation part for early stopping."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @classmethod
    def of(cls, images, labels, *, val_fraction: float = 0.1, seed: int = 0) -> "Split":
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if len(x) != len(y) or len(x) < 10:
            raise ValueError(f"need at least 10 labelled samples, got {len(x)} images and {len(y)} labels")
        (x_train, y_train), (x_val, y_val) = validation_split(x, y, fraction=val_fraction, seed=seed, shuffle="torch", at_least=1)
        return cls(x_train, y_train, x_val, y_val)


@dataclass
class FitConfig:
    """One training stage: Adam, cross-entropy, early stopping on validation accuracy."""

    epochs: int = 5
    lr: float = 1e-3
    patience: int = 2
    batch_size: int = 64
    clip_norm: float = 5.0
    seed: int = 0


@dataclass
class StageLog:
    stage: str
    epochs_run: int
    best_val_accuracy: float
    history: list[float] = field(default_factory=list)


def fit(
    model: nn.Module,
    data: Split,
    config: FitConfig,
    *,
    stage: str = "train",
    params: list[nn.Parameter] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> StageLog:
    """Train `params` (default: all) with early stopping; the model ends with its best weights.

    `after_step(step)` runs after every optimizer step (pruning re-applies its masks there).
    """
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ConversionError(f"stage '{stage}' has nothing to train")
    opt = torch.optim.Adam(params, lr=config.lr)
    best = evaluate_accuracy(model, data.x_val, data.y_val)
    best_state = copy.deepcopy(model.state_dict())
    history, stale = [best], 0

    def early_stop(_epoch: int) -> bool:
        nonlocal best, best_state, stale
        acc = evaluate_accuracy(model, data.x_val, data.y_val)
        history.append(acc)
        if acc > best:
            best, stale = acc, 0
            best_state = copy.deepcopy(model.state_dict())
            return False
        stale += 1
        return stale >= config.patience

    epoch = train_loop(
        model,
        data.x_train,
        data.y_train,
        opt,
        batch_size=config.batch_size,
        seed=config.seed,
        epochs=config.epochs,
        clip_norm=config.clip_norm,
        after_step=None if after_step is None else lambda s: after_step(s.step),
        after_epoch=early_stop,
    )
    model.load_state_dict(best_state)
    model.eval()
    _log.info("%s: %d epochs, best validation accuracy %.4f", stage, epoch, best)
    return StageLog(stage, epoch, best, history)


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the leaf modules in the order one forward pass calls them."""
    names = {m: n for n, m in model.named_modules() if not list(m.children())}
    order: list[str] = []
    run_hooked(model, example[:1], names, lambda mod, _i, _o: order.append(names[mod]))
    return order


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (works inside Sequential and ModuleDict)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def avg_pool_like(pool: nn.MaxPool2d) -> nn.AvgPool2d:
    if pool.ceil_mode or pool.dilation not in (1, (1, 1)) or pool.return_indices:
        raise ConversionError(f"MaxPool2d {pool} uses ceil_mode, dilation or indices, which have no AvgPool2d equivalent here")
    return nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, count_include_pad=True)


def convert_pooling(model: nn.Module, example: torch.Tensor) -> int:
    """MaxPool2d -> AvgPool2d only (when AutoReP learns the ReLU masks next); returns how many."""
    names = [n for n in forward_order(model, example) if isinstance(model.get_submodule(n), nn.MaxPool2d)]
    for name in names:
        set_module(model, name, avg_pool_like(model.get_submodule(name)))
    return len(names)


def structure_after_conversion(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """An untrained copy with every replacement made (a ReLU fit with nonzero c0): for structural checks."""
    trial = copy.deepcopy(model)
    for name in replaceable_layers(trial, example):
        module = trial.get_submodule(name)
        set_module(trial, name, avg_pool_like(module) if isinstance(module, nn.MaxPool2d) else PolyAct.fit_relu(1.0))
    return trial


def _replacement(model: nn.Module, name: str, x: torch.Tensor) -> nn.Module:
    """The HE-friendly layer for `name`; a polynomial fits ReLU over the range its input takes."""
    module = model.get_submodule(name)
    if isinstance(module, nn.MaxPool2d):
        return avg_pool_like(module)
    seen: list[torch.Tensor] = []
    run_hooked(model, x, [module], lambda _m, inputs, _o: seen.append(inputs[0].detach()))
    return PolyAct.fit_relu(3.0 * float(seen[0].std()))


def replaceable_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """ReLU and MaxPool2d modules in forward order; any other activation is refused by name."""
    order = forward_order(model, example)
    refused = [
        f"{n} ({type(model.get_submodule(n)).__name__})"
        for n in order
        if isinstance(model.get_submodule(n), (nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.ReLU6))
    ]
    if refused:
        raise ConversionError(f"activations other than ReLU are not converted: {', '.join(refused)}; use nn.ReLU")
    return [n for n in order if isinstance(model.get_submodule(n), (nn.ReLU, nn.MaxPool2d))]


@dataclass
class ConversionConfig:
    """Per-layer stages from the last layer to the first, then a whole-model fine-tune."""

    per_layer: FitConfig = field(default_factory=lambda: FitConfig(epochs=2, lr=1e-3, patience=1))
    finetune: FitConfig = field(default_factory=lambda: FitConfig(epochs=6, lr=1e-4, patience=2))


def convert_he_friendly(model: nn.Module, data: Split, config: ConversionConfig | None = None) -> list[StageLog]:
    """Convert `model` in place: no MaxPool2d or ReLU remains; returns each stage's log.

    For each ReLU/MaxPool2d from the last to the first: replace it, freeze the parameters of
    every layer that runs before it, train the rest with early stopping. Then unfreeze and
    fine-tune everything at the lower rate.
    """
    config = config or ConversionConfig()
    example = data.x_train[:256]
    targets = replaceable_layers(model, example)
    if not targets:
        raise ConversionError("the model has no ReLU or MaxPool2d to convert")
    logs = []
    for name in reversed(targets):
        set_module(model, name, _replacement(model, name, example))
        order = forward_order(model, example)
        before = set(order[: order.index(name)])
        trainable = [
            p for n in order[order.index(name) :] for p in model.get_submodule(n).parameters(recurse=False)
        ]
        if trainable:
            logs.append(fit(model, data, config.per_layer, stage=f"replace {name}", params=trainable))
        _log.debug("replaced %s; %d layers before it frozen", name, len(before))
    logs.append(fit(model, data, config.finetune, stage="fine-tune"))
    left = [n for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.MaxPool2d))]
    if left:  # pragma: no cover - the loop above replaced every one
        raise ConversionError(f"conversion left {left} behind")
    return logs
