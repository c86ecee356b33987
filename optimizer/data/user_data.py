"""The user's own training data: a .npz with `x` and `y`, or a folder of images, one sub-folder per class.

Images are read with pillow, in the folder's own mode ("L": 1 channel, "RGB": 3), scaled from
0..255 to [0, 1]. A normalisation `(x - mean) / std` (per channel, or one value for all) is
applied once, here; the artifact records it beside the input range the normalised samples
span, so whoever prepares the client's inputs applies the same one. Everything the model
cannot use is refused before any training, with the row or file that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VALIDATION_FRACTION = 0.1  # the one held-out share (optimizer/common/validation.py draws it)
_GREY_BANDS = ("1", "L", "I", "I;16", "F")
MIN_VALIDATION = 10  # fewer held-out samples cannot tell candidates apart


class DataError(ValueError):
    """The user's data cannot train this model: missing, malformed, or not fitting it."""


@dataclass(frozen=True)
class Normalization:
    """x' = (x - mean) / std, per channel (one value each for every channel when given once)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise DataError(f"--normalize gives {len(self.mean)} means but {len(self.std)} standard deviations")
        if not all(np.isfinite(self.mean)) or not all(np.isfinite(self.std)) or min(self.std) <= 0:
            raise DataError(f"--normalize needs finite means and positive standard deviations, got {self.mean}, {self.std}")

    @classmethod
    def parse(cls, text: str) -> "Normalization":
        """'MEAN,STD', each a number or a '/'-separated list per channel: '0.5,0.25' or '0.4/0.5/0.6,0.2/0.2/0.2'."""
        parts = text.split(",")
        if len(parts) != 2:
            raise DataError(f"--normalize takes MEAN,STD (e.g. 0.1307,0.3081), got {text!r}")
        try:
            mean, std = (tuple(float(v) for v in p.split("/")) for p in parts)
        except ValueError:
            raise DataError(f"--normalize takes numbers, MEAN,STD (e.g. 0.1307,0.3081), got {text!r}") from None
        return cls(mean, std)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalise (N, C, ...) samples; a per-channel normalisation must match C."""
        if len(self.mean) not in (1, x.shape[1] if x.ndim > 1 else 1):
            raise DataError(f"--normalize gives {len(self.mean)} values per channel, but the samples have {x.shape[1]} channels")
        view = (1, -1) + (1,) * (x.ndim - 2) if len(self.mean) > 1 else (1,)
        mean = np.asarray(self.mean, np.float32).reshape(view)
        std = np.asarray(self.std, np.float32).reshape(view)
        return ((x - mean) / std).astype(np.float32)

    def as_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "formula": "(x - mean) / std per channel, before the model"}


@dataclass
class UserData:
    """Samples float32 (N, ...), labels int64 (N,), and where they came from."""

    x: np.ndarray
    y: np.ndarray
    source: str
    classes: list[str] = field(default_factory=list)  # folder names in label order (image folders)
    pixel_scale: float | None = None  # 1/255 when images were read
    normalization: Normalization | None = None

    def manifest(self) -> dict[str, Any]:
        """What the artifact records about the data: source, size, classes, pixel scaling."""
        out: dict[str, Any] = {"source": self.source, "samples": int(len(self.x)), "sample_shape": list(self.x.shape[1:])}
        if self.classes:
            out["classes"] = self.classes
        if self.pixel_scale is not None:
            out["pixel_scale"] = self.pixel_scale
        return out  # the normalisation is the manifest's own `input_normalization`


def load_user_data(path: str | Path, normalization: Normalization | None = None) -> UserData:
    """A .npz file (arrays `x` and `y`) or an image folder, normalised when asked."""
    path = Path(path)
    if path.is_dir():
        data = _image_folder(path)
    elif path.is_file() and path.suffix == ".npz":
        data = _npz(path)
    elif path.exists():
        raise DataError(f"--data {path}: give a .npz file with arrays x and y, or a folder with one sub-folder of images per class")
    else:
        raise DataError(f"--data {path} does not exist (a .npz file, an image folder, or one of the built-in data sets)")
    if not np.isfinite(data.x).all():
        row = int(np.flatnonzero(~np.isfinite(data.x.reshape(len(data.x), -1)).all(1))[0])
        raise DataError(f"{path}: sample {row} holds NaN or infinite values")
    if normalization is not None:
        data.x = normalization.apply(data.x)
        data.normalization = normalization
    return data


def _npz(path: Path) -> UserData:
    try:
        with np.load(path, allow_pickle=False) as archive:  # no pickles: a data file must not run code
            arrays = {k: archive[k] for k in archive.files if k in ("x", "y")}
            names = sorted(archive.files)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read as a .npz file: {err}") from None
    if set(arrays) != {"x", "y"}:
        raise DataError(f"{path} has arrays {names}, but needs 'x' (samples) and 'y' (labels)")
    x, y = arrays["x"], arrays["y"]
    if x.ndim < 2:
        raise DataError(f"{path}: x has shape {x.shape}; it must be (samples, ...features)")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: y has shape {y.shape}; it must be one label per sample, ({len(x)},)")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.mod(y, 1) == 0):
            raise DataError(f"{path}: labels must be whole class numbers, got dtype {y.dtype}")
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise DataError(f"{path}: x must hold real numbers, got dtype {x.dtype}")
    return UserData(x.astype(np.float32), y.astype(np.int64), str(path))


def _image_folder(root: Path) -> UserData:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no sub-folders: put each class's images in a sub-folder named after it")
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: tuple[Path, str, tuple[int, int]] | None = None
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            try:
                with Image.open(f) as img:
                    img.load()
                    mode = "L" if img.getbands()[0] in _GREY_BANDS else "RGB"  # palette, CMYK, RGBA: colour
                    if first is None:
                        first = (f, mode, img.size)
                    if mode != first[1] or img.size != first[2]:
                        raise DataError(
                            f"{f} is {img.size[0]}x{img.size[1]} {mode}, but {first[0]} is {first[2][0]}x{first[2][1]} "
                            f"{first[1]}: every image must have the size and channels the model takes"
                        )
                    pixels = np.asarray(img.convert(mode), dtype=np.float32)
            except (OSError, UnidentifiedImageError) as err:
                raise DataError(f"{f} cannot be read as an image: {err}") from None
            images.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
            labels.append(label)
    x = np.stack(images) / 255.0
    return UserData(x.astype(np.float32), np.asarray(labels, np.int64), str(root), classes=classes, pixel_scale=1 / 255)


def check_fits(data: UserData, sample_shape: tuple[int, ...], num_classes: int) -> None:
    """Shapes the model takes, labels it can output, and enough samples for the validation split."""
    if tuple(data.x.shape[1:]) != tuple(sample_shape):
        raise DataError(
            f"{data.source}: samples are {tuple(data.x.shape[1:])}, but the model takes {tuple(sample_shape)} "
            "(channels first, no batch axis)"
        )
    bad = np.flatnonzero((data.y < 0) | (data.y >= num_classes))
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{data.source}: label {int(data.y[row])} of sample {row} is outside 0..{num_classes - 1} "
            f"(the model has {num_classes} outputs); {len(bad)} labels are out of range"
        )
    held_out = int(len(data.x) * VALIDATION_FRACTION)
    if held_out < MIN_VALIDATION or len(data.x) - held_out < MIN_VALIDATION:
        need = int(np.ceil(MIN_VALIDATION / VALIDATION_FRACTION))
        raise DataError(
            f"{data.source}: {len(data.x)} samples are too few for the validation split: {VALIDATION_FRACTION:.0%} held out "
            f"is {held_out}, at least {MIN_VALIDATION} are needed; give at least {need} samples"
        )
