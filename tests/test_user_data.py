"""`twinfer optimize --data PATH`: the user's own .npz or image folder, normalised once, recorded in the
artifact; data the model cannot use refused before training with one message naming the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from twinfer.deploy.cli.cli import EXIT_INPUT, main
from twinfer.optimizer.data.user_data import DataError, Normalization, check_fits, load_user_data
from twinfer.protocols.passes.onnx_export import export_onnx

SIDE, CLASSES = 12, 3


def small_cnn(channels: int = 1) -> nn.Sequential:
    """Conv-ReLU-MaxPool twice and a small head: every structure the optimizer can change, in a second."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, CLASSES),
    ).eval()  # fmt: skip


def stripes(n: int, seed: int = 0, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixels 0..255; class c has a bright vertical band in the c-th third of the image."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.random((n, channels, SIDE, SIDE)) * 80
    for i, c in enumerate(y):
        x[i, :, :, c * 4 : (c + 1) * 4] += 170
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture()
def onnx_model(tmp_path):
    path = tmp_path / "cnn.onnx"
    path.write_bytes(export_onnx(small_cnn(), torch.zeros(1, 1, SIDE, SIDE)))
    return path


def optimize(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["optimize", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_npz_normalised_once_recorded_with_the_input_range(tmp_path, onnx_model, capsys):
    x, y = stripes(200)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    code, out, err = optimize(
        capsys, "--model", str(onnx_model), "--data", str(tmp_path / "d.npz"), "--normalize", "127.5,64",
        "--relu-budget", "300", "--epochs", "10", "--out", str(tmp_path / "a"), "--json",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["input_normalization"]["mean"] == [127.5] and manifest["input_normalization"]["std"] == [64.0]
    assert manifest["data"] == {"source": str(tmp_path / "d.npz"), "samples": 200, "sample_shape": [1, SIDE, SIDE]}
    # The declared input range is that of the normalised training part (180 of 200, the rest held out).
    lo, hi = manifest["input_range"]
    normalised = (x - 127.5) / 64
    assert normalised.min() <= lo < hi <= normalised.max() and hi - lo > 0.9 * (normalised.max() - normalised.min())
    assert lo < 0 < hi  # raw pixels would have given 0..255
    assert 0 < manifest["relu_count"] <= 300 and manifest["accuracy_after"] > 0.5


def test_image_folder_one_class_per_subfolder(tmp_path, capsys):
    x, y = stripes(120, seed=1, channels=3)
    names = ["left", "middle", "right"]
    for i, (img, label) in enumerate(zip(x, y)):
        folder = tmp_path / "imgs" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0).astype(np.uint8), "RGB").save(folder / f"{i:04d}.png")
    data = load_user_data(tmp_path / "imgs", Normalization.parse("0.5/0.5/0.5,0.25/0.25/0.25"))
    assert data.classes == names and data.x.shape == (120, 3, SIDE, SIDE)
    order = np.concatenate([np.flatnonzero(y == c) for c in range(CLASSES)])  # files are read class by class
    np.testing.assert_array_equal(data.y, y[order])
    np.testing.assert_allclose(data.x, (np.floor(x[order]) / 255 - 0.5) / 0.25, atol=1e-5)
    model = tmp_path / "rgb.onnx"
    model.write_bytes(export_onnx(small_cnn(channels=3), torch.zeros(1, 3, SIDE, SIDE)))
    code, out, err = optimize(
        capsys, "--model", str(model), "--data", str(tmp_path / "imgs"), "--normalize", "0.5,0.25", "--relu-budget", "200",
        "--epochs", "10", "--out", str(tmp_path / "a"), "--json",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["data"]["classes"] == names and manifest["data"]["pixel_scale"] == pytest.approx(1 / 255)
    assert (tmp_path / "a" / "model.onnx").is_file() and manifest["relu_count"] <= 200


@pytest.mark.parametrize(
    "case, message",
    [
        ("label", "label 7 of sample 3 is outside 0..2 (the model has 3 outputs); 1 labels are out of range"),
        ("shape", "samples are (1, 10, 10), but the model takes (1, 12, 12)"),
        ("few", "60 samples are too few for the validation split: 10% held out is 6, at least 10 are needed; give at least 100"),
        ("keys", "has arrays ['images', 'y'], but needs 'x' (samples) and 'y' (labels)"),
        ("nan", "sample 5 holds NaN or infinite values"),
    ],
)
def test_bad_npz_is_one_clear_input_error(tmp_path, onnx_model, capsys, case, message):
    x, y = stripes(150)
    arrays = {"x": x, "y": y}
    if case == "label":
        y[3] = 7
    elif case == "shape":
        arrays["x"] = x[:, :, :10, :10]
    elif case == "few":
        arrays = {"x": x[:60], "y": y[:60]}
    elif case == "keys":
        arrays = {"images": x, "y": y}
    elif case == "nan":
        x[5, 0, 1, 1] = np.nan
    np.savez(tmp_path / "bad.npz", **arrays)
    code, _, err = optimize(
        capsys, "--model", str(onnx_model), "--data", str(tmp_path / "bad.npz"), "--relu-budget", "100", "--out", str(tmp_path / "a")
    )  # fmt: skip
    assert code == EXIT_INPUT
    assert message in err and err.count("error") == 1
    assert not (tmp_path / "a").exists()  # refused before any training


def test_image_folder_errors_name_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("L", (12, 12)).save(tmp_path / "a" / "one.png")
    Image.new("L", (10, 12)).save(tmp_path / "a" / "two.png")
    with pytest.raises(DataError, match=r"two.png is 10x12 L, but .*one.png is 12x12 L"):
        load_user_data(tmp_path)
    (tmp_path / "a" / "two.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"two.png cannot be read as an image"):
        load_user_data(tmp_path)
    with pytest.raises(DataError, match="has no sub-folders"):
        load_user_data(tmp_path / "a")
    with pytest.raises(DataError, match="does not exist"):
        load_user_data(tmp_path / "missing.npz")


def test_normalization_parsing_and_channel_check():
    assert Normalization.parse("0.1307,0.3081") == Normalization((0.1307,), (0.3081,))
    for bad, why in (("1", "MEAN,STD"), ("a,b", "numbers"), ("0,0", "positive"), ("0/0,1", "2 means but 1")):
        with pytest.raises(DataError, match=why):
            Normalization.parse(bad)
    with pytest.raises(DataError, match="3 values per channel, but the samples have 1 channels"):
        Normalization.parse("0/0/0,1/1/1").apply(np.zeros((2, 1, 4, 4), np.float32))


def test_check_fits_counts_validation_after_the_split():
    from twinfer.optimizer.data.user_data import UserData

    x, y = stripes(100)
    check_fits(UserData(x, y, "mem"), (1, SIDE, SIDE), CLASSES)  # 10 held out: just enough
    with pytest.raises(DataError, match="99 samples are too few"):
        check_fits(UserData(x[:99], y[:99], "mem"), (1, SIDE, SIDE), CLASSES)


def test_twinfer_optimize_takes_a_torch_module_and_the_commands_options(tmp_path):
    import twinfer

    x, y = stripes(200)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    artifact = twinfer.optimize(small_cnn(), str(tmp_path / "d.npz"), tmp_path / "a", normalize="127.5,64", relu_budget=300, epochs=10)
    assert artifact.manifest["input_normalization"]["mean"] == [127.5] and 0 < artifact.manifest["relu_count"] <= 300
    from twinfer.protocols.artifact import Artifact

    assert Artifact.read(tmp_path / "a").manifest == artifact.manifest
    with pytest.raises(TypeError, match="does not take: relu_budjet"):
        twinfer.optimize(small_cnn(), str(tmp_path / "d.npz"), tmp_path / "b", relu_budjet=300)
    with pytest.raises(TypeError, match="does not take: json"):
        twinfer.optimize(small_cnn(), str(tmp_path / "d.npz"), tmp_path / "b", json=True)
