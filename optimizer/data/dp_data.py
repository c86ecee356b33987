"""Categorical click data for DP embedding training: MovieLens-100k and a generated Zipf log.

Every example is a row of categorical ids, one per field (user, item, age, ...), and a binary
label. Field f's ids lie in [0, vocab_sizes[f]). MovieLens-100k is read at run time from the
`recbole` wheel's example files (installed with --no-deps, never imported: it pins an old
Ray); the GroupLens terms forbid redistributing it, so nothing here copies it anywhere. The
Zipf click-log is generated, and its name says so wherever it is printed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np

from twinfer.optimizer.common.validation import validation_split

MOVIELENS = "movielens-100k"
ZIPF = "generated-zipf"
DATASETS = (MOVIELENS, ZIPF)

_RECBOLE_HINT = "install it with `pip install --no-deps recbole==1.2.1` (or `make setup`)"


class DataError(ValueError):
    """A dataset is unknown, missing or malformed."""


@dataclass
class CategoricalData:
    """Train and test examples as int64 ids (N x F) and float32 labels in {0, 1}."""

    name: str
    fields: list[str]
    vocab_sizes: list[int]
    train_ids: np.ndarray
    train_labels: np.ndarray
    test_ids: np.ndarray
    test_labels: np.ndarray
    generated: bool
    description: str

    @property
    def vocab_total(self) -> int:
        return int(sum(self.vocab_sizes))

    def validation_split(self, fraction: float = 0.1, seed: int = 0) -> "CategoricalData":
        """The training examples split again: a random `fraction` becomes the test part (for tuning)."""
        if not 0 < fraction < 1:
            raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
        (train_ids, train_labels), (val_ids, val_labels) = validation_split(
            self.train_ids, self.train_labels, fraction=fraction, seed=seed
        )
        return replace(
            self,
            name=f"{self.name} (validation split)",
            train_ids=train_ids,
            train_labels=train_labels,
            test_ids=val_ids,
            test_labels=val_labels,
            description=f"{self.description}; {fraction:g} of the training examples held out for validation",
        )

    def summary(self) -> dict:
        return {
            "dataset": self.name,
            "generated": self.generated,
            "description": self.description,
            "fields": dict(zip(self.fields, self.vocab_sizes)),
            "vocab_total": self.vocab_total,
            "train_examples": int(len(self.train_ids)),
            "test_examples": int(len(self.test_ids)),
            "positive_rate": float(self.train_labels.mean()),
        }


def load_dataset(name: str, *, seed: int = 0, zipf_vocab: int = 1_000_000, zipf_examples: int = 200_000) -> CategoricalData:
    """A dataset by name: 'movielens-100k' or 'generated-zipf'."""
    if name == MOVIELENS:
        return load_movielens_100k(seed=seed)
    if name == ZIPF:
        return generate_zipf_clicks(vocab=zipf_vocab, examples=zipf_examples, seed=seed)
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def movielens_dir() -> Path:
    """The ml-100k example folder inside the installed recbole wheel (found without importing it)."""
    try:
        dist = distribution("recbole")
    except PackageNotFoundError:
        raise DataError(f"MovieLens-100k is read from the recbole wheel, which is not installed; {_RECBOLE_HINT}") from None
    folder = Path(str(dist.locate_file("recbole/dataset_example/ml-100k")))
    if not (folder / "ml-100k.inter").exists():
        raise DataError(f"recbole is installed but {folder}/ml-100k.inter is missing; reinstall: {_RECBOLE_HINT}")
    return folder


def _read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="latin-1") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise DataError(f"{path} is empty")
    header = [h.split(":", 1)[0] for h in rows[0]]
    return header, [r for r in rows[1:] if r]


def _index(values: list[str]) -> tuple[dict[str, int], int]:
    """Ids 0..n-1 for the distinct values, in sorted order (a public, data-independent order)."""
    vocab = {v: i for i, v in enumerate(sorted(set(values)))}
    return vocab, len(vocab)


def load_movielens_100k(*, seed: int = 0, test_fraction: float = 0.2, folder: Path | None = None) -> CategoricalData:
    """100,000 ratings; label = rating >= 4; user and item features as extra categorical fields.

    Fields: user, item, age, gender, occupation, zip (first digit), release year, first genre.
    The split is a seeded random 80/20 split of the ratings.
    """
    folder = folder or movielens_dir()
    inter_h, inter = _read_table(folder / "ml-100k.inter")
    user_h, users = _read_table(folder / "ml-100k.user")
    item_h, items = _read_table(folder / "ml-100k.item")
    try:
        ui, ii, ri = inter_h.index("user_id"), inter_h.index("item_id"), inter_h.index("rating")
        user_feat = {r[user_h.index("user_id")]: r for r in users}
        item_feat = {r[item_h.index("item_id")]: r for r in items}
        age, gender, occ, zipc = (user_h.index(k) for k in ("age", "gender", "occupation", "zip_code"))
        year, genre = item_h.index("release_year"), item_h.index("class")
    except ValueError as err:
        raise DataError(f"{folder}: unexpected MovieLens columns: {err}") from None

    def user_of(r, col):
        return user_feat[r[ui]][col] if r[ui] in user_feat else ""

    def item_of(r, col):
        row = item_feat.get(r[ii])
        return row[col] if row is not None and col < len(row) else ""

    columns = {
        "user": [r[ui] for r in inter],
        "item": [r[ii] for r in inter],
        "age": [user_of(r, age) for r in inter],
        "gender": [user_of(r, gender) for r in inter],
        "occupation": [user_of(r, occ) for r in inter],
        "zip": [user_of(r, zipc)[:1] for r in inter],
        "year": [item_of(r, year) for r in inter],
        "genre": [(item_of(r, genre).split(" ") or [""])[0] for r in inter],
    }
    fields, vocab_sizes, cols = [], [], []
    for name, values in columns.items():
        vocab, size = _index(values)
        fields.append(name)
        vocab_sizes.append(size)
        cols.append(np.fromiter((vocab[v] for v in values), dtype=np.int64, count=len(values)))
    ids = np.stack(cols, axis=1)
    labels = (np.array([float(r[ri]) for r in inter]) >= 4).astype(np.float32)
    (train_ids, train_labels), (test_ids, test_labels) = validation_split(ids, labels, fraction=test_fraction, seed=seed)
    return CategoricalData(
        name=MOVIELENS,
        fields=fields,
        vocab_sizes=vocab_sizes,
        train_ids=train_ids,
        train_labels=train_labels,
        test_ids=test_ids,
        test_labels=test_labels,
        generated=False,
        description="MovieLens-100k ratings (GroupLens), label rating >= 4",
    )


def generate_zipf_clicks(
    *, vocab: int = 1_000_000, examples: int = 200_000, exponent: float = 1.1, seed: int = 0, test_fraction: float = 0.1
) -> CategoricalData:
    """GENERATED click-log: one Zipf-distributed id field with `vocab` rows, plus a small context field.

    Each id has a latent score; the label is Bernoulli(sigmoid(score[id] + score[context])). The
    data is synthetic, made for scale measurements, and named 'generated-zipf' everywhere.
    """
    if vocab < 2 or examples < 10:
        raise DataError(f"the generated click-log needs vocab >= 2 and examples >= 10, got {vocab} and {examples}")
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks**-exponent
    p /= p.sum()
    perm = rng.permutation(vocab)  # popular ids are not simply the small ones
    ids = perm[rng.choice(vocab, size=examples, p=p)]
    context_vocab = 16
    context = rng.integers(0, context_vocab, size=examples)
    id_score = rng.normal(0.0, 1.0, size=vocab)
    ctx_score = rng.normal(0.0, 0.5, size=context_vocab)
    logits = id_score[ids] + ctx_score[context]
    labels = (rng.random(examples) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    all_ids = np.stack([ids, context], axis=1).astype(np.int64)
    n_test = int(round(examples * test_fraction))
    return CategoricalData(
        name=ZIPF,
        fields=["id", "context"],
        vocab_sizes=[vocab, context_vocab],
        train_ids=all_ids[n_test:],
        train_labels=labels[n_test:],
        test_ids=all_ids[:n_test],
        test_labels=labels[:n_test],
        generated=True,
        description=f"GENERATED Zipf(s={exponent}) click-log, {vocab} id rows, {examples} examples (synthetic)",
    )
