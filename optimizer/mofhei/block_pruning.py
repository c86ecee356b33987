"""MOFHEI step 2: packing-aware block pruning, then culling into a smaller dense model.

A block is one conv filter or one output neuron (protocols/cost_model.BlockShape "filter"):
with Beaver products each owns its weight row, its outputs and activations, and the next
layer's input channel. Blocks are scored by mean |w|; a constant target sparsity (per layer)
is re-applied every few steps while the model trains; then the mask is fixed, training
continues with early stopping, and `cull` deletes the pruned blocks and the downstream input
channels they fed. The logits layer is never pruned.

Unstructured magnitude pruning at the same sparsity is the baseline: it zeroes weights but the
model keeps its shapes, so it removes no cryptographic work.

Pruning and culling work on a chain of layers: an nn.Sequential (nested ones are flattened)
or a GraphModule (optimizer/common/graph_module.py) whose nodes each read the previous one's output.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from twinfer.optimizer.common.graph_module import GraphModule, Reshape
from twinfer.optimizer.common.hooks import run_hooked
from twinfer.optimizer.mofhei.he_friendly import FitConfig, PolyAct, Split, StageLog, fit
from twinfer.protocols.cost_model import FILTER_BLOCKS, BlockShape

LINEAR = (nn.Conv2d, nn.Linear)
# Layers that act on each channel separately: a pruned channel can be dropped through them.
CHANNELWISE = (nn.ReLU, PolyAct, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout)


class PruningError(ValueError):
    """Bad pruning request, or a model whose structure block pruning cannot follow."""


def check_sparsity(sparsity: float) -> float:
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise PruningError(f"target sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise PruningError(f"target sparsity must be in [0, 1), got {value}")
    return value


def chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) in execution order; refuses anything that is not a chain."""
    if isinstance(model, GraphModule):
        out = []
        previous = model.graph.input_name
        for node, key in zip(model.graph.nodes, model.keys):
            if len(node.inputs) != 1 or node.inputs[0] != previous or key not in model.layers:
                raise PruningError(f"layer '{node.name}' ({node.op}) does not just follow the previous layer; block pruning needs a chain")
            out.append((f"layers.{key}", model.layers[key]))
            previous = node.output
        return out
    if isinstance(model, nn.Sequential):
        out = []
        for name, m in model.named_children():
            if isinstance(m, nn.Sequential):
                out.extend((f"{name}.{n}", sub) for n, sub in chain(m))
            else:
                out.append((name, m))
        return out
    raise PruningError(f"block pruning needs an nn.Sequential or a GraphModule, got {type(model).__name__}")


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d/Linear layers that may lose blocks: every one but the last (the logits)."""
    linear = [(n, m) for n, m in chain(model) if isinstance(m, LINEAR)]
    if not linear:
        raise PruningError("the model has no Conv2d or Linear layer")
    for n, m in linear:
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise PruningError(f"layer '{n}' is a grouped convolution; block pruning needs groups=1")
    return linear[:-1]


def block_scores(layer: nn.Module, block: BlockShape = FILTER_BLOCKS) -> torch.Tensor:
    """Mean |w| of each block (a filter / output neuron for the "filter" shape)."""
    w = layer.weight.detach().abs()
    return w.reshape(block.count(tuple(w.shape)), -1).mean(dim=1)


def blocks_to_keep(n_blocks: int, sparsity: float) -> int:
    """At least one block survives in every layer."""
    return max(1, n_blocks - int(math.floor(sparsity * n_blocks + 1e-9)))


@dataclass
class BlockPruner:
    """Keeps a boolean block mask per prunable layer and zeroes the pruned blocks."""

    layers: dict[str, nn.Module]
    sparsity: float
    block: BlockShape = FILTER_BLOCKS
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: nn.Module, sparsity: float, block: BlockShape = FILTER_BLOCKS) -> "BlockPruner":
        return cls(dict(prunable(model)), check_sparsity(sparsity), block)

    def update(self) -> None:
        """Re-choose the blocks to keep by magnitude (constant sparsity), then zero the others."""
        for name, layer in self.layers.items():
            scores = block_scores(layer, self.block)
            keep = torch.topk(scores, blocks_to_keep(len(scores), self.sparsity)).indices
            mask = torch.zeros(len(scores), dtype=torch.bool)
            mask[keep] = True
            self.masks[name] = mask
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for name, mask in self.masks.items():
            layer = self.layers[name]
            layer.weight[~mask] = 0.0
            if layer.bias is not None:
                layer.bias[~mask] = 0.0

    def kept(self) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.masks.items()}


@dataclass
class UnstructuredPruner:
    """The baseline: the smallest |w| of each prunable layer set to zero; shapes stay."""

    layers: dict[str, nn.Module]
    sparsity: float
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: nn.Module, sparsity: float) -> "UnstructuredPruner":
        return cls(dict(prunable(model)), check_sparsity(sparsity))

    def update(self) -> None:
        for name, layer in self.layers.items():
            w = layer.weight.detach().abs().reshape(-1)
            n_zero = int(math.floor(self.sparsity * w.numel()))
            mask = torch.ones(w.numel(), dtype=torch.bool)
            if n_zero:
                mask[torch.topk(w, n_zero, largest=False).indices] = False
            self.masks[name] = mask.reshape(layer.weight.shape)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for name, mask in self.masks.items():
            self.layers[name].weight[~mask] = 0.0


@dataclass
class PruneConfig:
    """Phase 1 re-applies the target sparsity every `every` steps; phase 2 trains with the mask fixed."""

    every: int = 25
    search: FitConfig = field(default_factory=lambda: FitConfig(epochs=3, lr=1e-3, patience=3))
    settle: FitConfig = field(default_factory=lambda: FitConfig(epochs=30, lr=3e-3, patience=6, batch_size=32))


def train_pruned(
    model: nn.Module, data: Split, pruner: BlockPruner | UnstructuredPruner, config: PruneConfig | None = None
) -> list[StageLog]:
    """Train `model` in place under `pruner`; at the end the pruned weights are exactly zero."""
    config = config or PruneConfig()
    if config.every < 1:
        raise PruningError(f"the mask must be re-applied every >= 1 steps, got {config.every}")
    pruner.update()

    def search_step(step: int) -> None:
        if step % config.every == 0:
            pruner.update()

    logs = [fit(model, data, config.search, stage="prune (mask re-applied)", after_step=search_step)]
    pruner.update()  # fix the mask from the best weights, then train with it held
    logs.append(fit(model, data, config.settle, stage="prune (mask fixed)", after_step=lambda _s: pruner.apply()))
    pruner.apply()
    return logs


# -- culling -------------------------------------------------------------------------------------


def _shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Input and output shape (one sample) of every layer of the chain."""
    layers = chain(model)
    names = {id(m): n for n, m in layers}
    shapes = {}
    run_hooked(
        model, example[:1], [m for _, m in layers], lambda mod, i, o: shapes.__setitem__(names[id(mod)], (i[0].shape[1:], o.shape[1:]))
    )
    return shapes


def _constant_through(module: nn.Module, value: float) -> float:
    """What a channel that holds `value` everywhere holds after a channel-wise layer."""
    if isinstance(module, PolyAct):
        c = module.coeffs.detach()
        return float(c[0] + c[1] * value + c[2] * value * value)
    if isinstance(module, nn.ReLU):
        return max(value, 0.0)
    return value  # pooling or identity keeps a constant map constant (average-pool padding checked by the caller)


def cull(model: nn.Module, masks: dict[str, torch.Tensor], example: torch.Tensor) -> nn.Sequential:
    """A dense nn.Sequential without the pruned blocks and the input channels they fed.

    A pruned block outputs exactly zero (weights and bias zeroed), so after its activation its
    channel holds a constant (the polynomial's c0); that constant's contribution is folded into
    the next linear layer's bias, so the culled model computes what the masked model computes.
    """
    layers = chain(model)
    shapes = _shapes(model, example)
    unknown = sorted(set(masks) - {n for n, _ in prunable(model)})
    if unknown:
        raise PruningError(f"masks name layers that are not prunable: {unknown} (the logits layer is never pruned)")
    out: list[nn.Module] = []
    kept: torch.Tensor | None = None  # channels of the current value that survive
    const: torch.Tensor | None = None  # the constant each channel holds when its block was pruned
    flat_from: tuple[int, int] | None = None  # (channels, positions per channel) before a flatten
    for name, m in layers:
        if isinstance(m, LINEAR):
            new, kept, const = _cull_linear(name, m, masks.get(name), kept, const, flat_from)
            flat_from = None
            out.append(new)
        elif isinstance(m, CHANNELWISE):
            if kept is not None and isinstance(m, nn.AvgPool2d) and _padded(m) and bool((const[~kept] != 0).any()):
                raise PruningError(f"layer '{name}' pads a pruned channel that holds a nonzero constant")
            if const is not None:
                const = torch.tensor([_constant_through(m, float(v)) for v in const])
            out.append(copy.deepcopy(m))
        elif isinstance(m, (nn.Flatten, Reshape)):
            in_shape, out_shape = shapes[name]
            if len(out_shape) != 1:
                raise PruningError(f"layer '{name}' reshapes to {tuple(out_shape)}; block pruning supports flattening only")
            if kept is not None:
                flat_from = (in_shape[0], int(torch.Size(in_shape[1:]).numel()))
            out.append(nn.Flatten())
        else:
            raise PruningError(
                f"layer '{name}' ({type(m).__name__}) is not supported by culling; "
                f"supported: Conv2d, Linear, ReLU, PolyAct, pooling, Flatten"
            )
    return nn.Sequential(*out).eval()


def check_cullable(model: nn.Module, example: torch.Tensor) -> None:
    """Fail before training when culling could not follow the model: cull a copy missing one block per layer."""
    trial = copy.deepcopy(model)
    pruner = BlockPruner.for_model(trial, 0.0)
    for name, layer in pruner.layers.items():
        mask = torch.ones(layer.weight.shape[0], dtype=torch.bool)
        mask[-1] = len(mask) == 1
        pruner.masks[name] = mask
    pruner.apply()
    cull(trial, pruner.masks, example)


def _padded(m: nn.Module) -> bool:
    p = getattr(m, "padding", 0)
    return any(v != 0 for v in (p if isinstance(p, (tuple, list)) else (p,)))


@torch.no_grad()
def _cull_linear(name, m, mask, kept_in, const, flat_from):
    """One Conv2d/Linear: drop pruned input channels (folding their constants) and pruned outputs."""
    w = m.weight.detach().clone()
    b = m.bias.detach().clone() if m.bias is not None else torch.zeros(w.shape[0])
    if kept_in is not None:
        dropped = (~kept_in).nonzero().reshape(-1)
        if isinstance(m, nn.Conv2d):
            if _padded(m) and bool((const[dropped] != 0).any()):
                raise PruningError(
                    f"layer '{name}' zero-pads input channels whose pruned producer leaves a nonzero constant; "
                    "its contribution then varies at the border and cannot be folded into a bias"
                )
            b += (w[:, dropped] * const[dropped].reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3))
            w = w[:, kept_in]
        else:
            cols_kept, cols_const = _columns(kept_in, const, flat_from, w.shape[1])
            b += w[:, ~cols_kept] @ cols_const[~cols_kept]
            w = w[:, cols_kept]
    out_kept = mask if mask is not None else torch.ones(w.shape[0], dtype=torch.bool)
    w, b = w[out_kept], b[out_kept]
    if isinstance(m, nn.Conv2d):
        new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, bias=True)
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias=True)
    new.weight.copy_(w)
    new.bias.copy_(b)
    if mask is None or bool(mask.all()):
        return new, None, None
    return new, out_kept, torch.zeros(len(out_kept))


def _columns(kept: torch.Tensor, const: torch.Tensor, flat_from, width: int):
    """Which input columns of a Linear survive, and the constant each dropped column holds."""
    if flat_from is None:
        return kept, const
    channels, per_channel = flat_from
    if channels * per_channel != width:
        raise PruningError(f"flattened width {channels} x {per_channel} does not match the Linear's {width} inputs")
    return kept.repeat_interleave(per_channel), const.repeat_interleave(per_channel)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def nonzero_parameter_count(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())
