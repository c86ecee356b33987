"""An embedding model for categorical data (one table, one row range per field, then an MLP),
its exact per-example gradients without a dense V x d tensor, and its deployable ONNX form.

Per-example gradients (B examples, F fields, d dims, x_i the concatenated embeddings):
  g_z = sigmoid(z) - y;  W2: g_z a_i;  h1 = W1 x + b1;  g_h = (g_z W2) * [h1 > 0];
  W1: g_h x_i^T (norm |g_h| |x_i|);  embeddings: rows r_if get (W1^T g_h)_f, a d-vector each.
So an example's gradient norm comes from B x (F d + h) numbers, and clipped sums of the MLP
weights are (c * g)^T a products: no per-example weight gradient is ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn


class EmbeddingMLP(nn.Module):
    """ids (B x F, field-local) -> one concatenated table -> MLP -> one logit.

    The table starts at zero, so a row that training never selects stays exactly zero and can
    be dropped at deployment without changing any prediction.
    """

    def __init__(self, vocab_sizes: list[int], dim: int = 16, hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        if not vocab_sizes or min(vocab_sizes) < 1:
            raise ValueError(f"every field needs a vocabulary of at least one id, got {vocab_sizes}")
        gen = torch.Generator().manual_seed(seed)
        self.vocab_sizes = list(vocab_sizes)
        self.dim = dim
        self.register_buffer("offsets", torch.tensor(np.concatenate([[0], np.cumsum(vocab_sizes)[:-1]]), dtype=torch.long))
        self.table = nn.Parameter(torch.zeros(int(sum(vocab_sizes)), dim))
        fan_in = len(vocab_sizes) * dim
        self.w1 = nn.Parameter(torch.randn(hidden, fan_in, generator=gen) * (2.0 / fan_in) ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(1, hidden, generator=gen) * (1.0 / hidden) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(1))

    @property
    def fields(self) -> int:
        return len(self.vocab_sizes)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Field-local ids -> rows of the concatenated table."""
        return ids + self.offsets

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.table[self.rows(ids)].flatten(1)
        return (torch.relu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2).squeeze(-1)

    def mlp_parameters(self) -> list[nn.Parameter]:
        return [self.w1, self.b1, self.w2, self.b2]


@dataclass
class ClippedGradients:
    """Sums of clipped per-example gradients: dense for the MLP, per-(example, field) rows for the table."""

    loss: float
    norms: torch.Tensor  # (B,) per-example gradient norms before clipping
    mlp: list[torch.Tensor]  # same order as EmbeddingMLP.mlp_parameters
    rows: torch.Tensor  # (B, F) table rows touched
    row_grads: torch.Tensor  # (B, F, d) clipped per-example gradient of each touched row


@torch.no_grad()
def clipped_gradients(model: EmbeddingMLP, ids: torch.Tensor, labels: torch.Tensor, clip: float) -> ClippedGradients:
    """Exact per-example gradients of the logistic loss, clipped to L2 norm `clip` (formulas above)."""
    rows = model.rows(ids)
    x = model.table[rows].flatten(1)  # (B, F d)
    h1 = x @ model.w1.T + model.b1
    a = torch.relu(h1)
    z = (a @ model.w2.T + model.b2).squeeze(-1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, labels, reduction="sum").item()
    g_z = torch.sigmoid(z) - labels  # (B,)
    g_h = (g_z[:, None] * model.w2) * (h1 > 0)  # (B, h)
    g_x = g_h @ model.w1  # (B, F d)
    gh2 = (g_h * g_h).sum(1)
    sq = g_z**2 * ((a * a).sum(1) + 1.0) + gh2 * ((x * x).sum(1) + 1.0) + (g_x * g_x).sum(1)
    norms = sq.sqrt()
    c = torch.clamp(clip / (norms + 1e-12), max=1.0)
    cg_z, cg_h = c * g_z, c[:, None] * g_h
    mlp = [cg_h.T @ x, cg_h.sum(0), (cg_z[:, None] * a).sum(0, keepdim=True), cg_z.sum(0, keepdim=True)]
    row_grads = (c[:, None] * g_x).reshape(len(ids), model.fields, model.dim)
    return ClippedGradients(loss=loss, norms=norms, mlp=mlp, rows=rows, row_grads=row_grads)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # average 1-based rank within ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def predict(model: EmbeddingMLP, ids: np.ndarray, batch: int = 65536) -> np.ndarray:
    out = [model(torch.from_numpy(ids[i : i + batch])) for i in range(0, len(ids), batch)]
    return torch.cat(out).numpy()


# -- deployment: keep the rows training selected, export ONNX --------------------------------


@dataclass
class DeployedEmbedding:
    """The kept rows and the public map from (field, id) to a row of the deployed table.

    Row index `len(kept)` is an all-zero row: every id whose row was dropped maps there.
    """

    table: np.ndarray  # (kept + 1, d), last row zero
    row_of: list[np.ndarray]  # per field: id -> deployed row
    kept_per_field: list[int]
    dropped_per_field: list[int]

    @property
    def rows(self) -> int:
        return int(self.table.shape[0])


def deploy_rows(model: EmbeddingMLP, updated: torch.Tensor) -> DeployedEmbedding:
    """Drop the rows never updated (still exactly zero); map their ids to one shared zero row."""
    table = model.table.detach().numpy()
    updated = updated.numpy().astype(bool)
    kept = np.flatnonzero(updated)
    position = np.full(len(table), len(kept), dtype=np.int64)
    position[kept] = np.arange(len(kept))
    offsets = model.offsets.numpy()
    row_of, kept_n, dropped_n = [], [], []
    for f, size in enumerate(model.vocab_sizes):
        span = slice(int(offsets[f]), int(offsets[f]) + size)
        row_of.append(position[span].copy())
        kept_n.append(int(updated[span].sum()))
        dropped_n.append(int(size - updated[span].sum()))
    deployed = np.concatenate([table[kept], np.zeros((1, table.shape[1]), dtype=table.dtype)]).astype(np.float32)
    return DeployedEmbedding(table=deployed, row_of=row_of, kept_per_field=kept_n, dropped_per_field=dropped_n)


def export_onnx(model: EmbeddingMLP, deployed: DeployedEmbedding) -> bytes:
    """ONNX: rows (N x F int64) -Gather-> (N, F, d) -Flatten-> Gemm -> Relu -> Gemm -> logit (N x 1)."""
    f = model.fields
    w1, b1, w2, b2 = (p.detach().numpy().astype(np.float32) for p in model.mlp_parameters())
    inits = [
        numpy_helper.from_array(deployed.table, "embedding.table"),
        numpy_helper.from_array(w1, "fc1.weight"),
        numpy_helper.from_array(b1, "fc1.bias"),
        numpy_helper.from_array(w2, "fc2.weight"),
        numpy_helper.from_array(b2, "fc2.bias"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding.table", "rows"], ["embedded"], name="embedding", axis=0),
        helper.make_node("Flatten", ["embedded"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu"),
        helper.make_node("Gemm", ["a1", "fc2.weight", "fc2.bias"], ["logit"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "dp_embedding_mlp",
        [helper.make_tensor_value_info("rows", TensorProto.INT64, ["N", f])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="twinfer")
    onnx.checker.check_model(onnx_model)
    return onnx_model.SerializeToString()
