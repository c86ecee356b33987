"""`twinfer bench sweep`: a strict config, and a small grid (an ONNX file and a ReLU-budget artifact) run as Ray tasks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from twinfer.deploy.bench.sweep import SweepConfig

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(
    "text, message",
    [
        ("models: [m.onnx]\nbatch_sizes: [1]\nnetworks: [lan]\nrepz: 2\n", r"sweep.yaml: unknown key 'repz'"),
        ("models: [m.onnx]\nbatch_sizes: [1]\n", r"key 'networks' is required"),
        ("models: [m.onnx]\nbatch_sizes: [0]\nnetworks: [lan]\n", r"'batch_sizes\[0\]' must be at least 1"),
        ("models: [m.onnx]\nbatch_sizes: [1]\nnetworks: [rtt=fast]\n", r"key 'networks\[0\]': network profile 'rtt=fast': cannot read rtt 'fast'"),
        ("models: [missing.onnx]\nbatch_sizes: [1]\nnetworks: [lan]\n", r"model missing.onnx does not exist"),
        ("models: m.onnx\nbatch_sizes: [1]\nnetworks: [lan]\n", r"key 'models' must be a list"),
        ("models: [m.onnx]\nprotocols: [fss, spdz]\nbatch_sizes: [1]\nnetworks: [lan]\n", r"'protocols\[1\]' must be one of crypten, fss, fss-compact, got 'spdz'"),
        ("models: [m.onnx]\nprotocols: [fss, fss]\nbatch_sizes: [1]\nnetworks: [lan]\n", r"key 'protocols' must name distinct protocols"),
    ],
)
def test_bad_sweep_config_names_file_and_key(tmp_path, text, message):
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "sweep.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        SweepConfig.load(tmp_path / "sweep.yaml")


def _budget_artifact(onnx_path, out):
    """An artifact that keeps a quarter of the first ReLU layer's positions (the rest: x^2 polynomial)."""
    from twinfer.optimizer.common.artifact import write_artifact
    from twinfer.protocols.ops.activation import ActivationSite

    mask = np.zeros((8, 28, 28), dtype=bool)
    mask[:2] = True
    coeffs = np.tile(np.array([[0.0, 0.5, 0.25]], dtype=np.float32), (8, 1))
    site = ActivationSite(mask=mask, coeffs=coeffs)
    return write_artifact(out, onnx_path.read_bytes(), {"relu_budget": "quarter of layer 1"}, sites={"/features/features.1/Relu": site})


def test_sweep_fans_the_grid_out_as_ray_tasks(tmp_path, onnx_files):
    budget = _budget_artifact(onnx_files["fashion_cnn"], tmp_path / "budget_quarter")
    (tmp_path / "sweep.yaml").write_text(
        f"models: [{onnx_files['fashion_cnn']}, budget_quarter]\nprotocols: [fss-compact, crypten]\nbatch_sizes: [1]\n"
        "networks: ['rtt=4ms,bw=1gbit']\nreps: 1\ncpus_per_run: 1\n"
    )
    assert budget.is_dir()
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "twinfer.deploy.cli", "bench", "sweep", "--config", str(tmp_path / "sweep.yaml"), "--out", str(out)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "4/4" in proc.stderr  # the progress bar counted every finished run
    result = json.loads((out / "sweep.json").read_text())
    rows = result["rows"]
    assert len(rows) == 4 and not any("error" in r for r in rows)
    assert {(r["model"], r["protocol"], r["profile"]) for r in rows} == {
        (m, p, "rtt=4ms,bw=1gbit") for m in ("fashion_cnn", "budget_quarter") for p in ("fss-compact", "crypten")
    }
    assert result["meta"]["protocols"] == ["fss-compact", "crypten"]
    relu = {r["model"]: r["relu_per_sample"] for r in rows}
    # the ONNX model's ReLUs move after their max-pools at import; an artifact's masks fit the graph as exported
    assert relu["fashion_cnn"] == 8 * 14 * 14 + 16 * 7 * 7 + 64
    assert relu["budget_quarter"] == 8 * 28 * 28 + 16 * 14 * 14 + 64 - 6 * 28 * 28
    for r in rows:
        assert r["relu_count"] == r["relu_per_sample"]  # measured per batch of one sample
        assert r["latency_s"] > 0 and r["model_kind"] == ("artifact" if r["model"] == "budget_quarter" else "onnx")
    assert all(r["latency_s"] >= r["lower_bound_s"] for r in rows)  # shaped in the transport: never under the bound
    assert result["meta"]["cpu_count"] >= 1
    for name in ("sweep.md", "sweep_latency.png", "sweep_throughput.png", "sweep_relu.png"):
        assert (out / name).stat().st_size > 0, name


def test_a_failing_run_is_reported_not_waited_on():
    """A sweep run whose party fails ends with that party's error at once (it used to wait out the timeout)."""
    import time

    from twinfer.deploy.launch.local import run_local_session
    from twinfer.parties.errors import ModelError

    start = time.monotonic()
    with pytest.raises(ModelError):
        run_local_session(b"not an onnx model", np.zeros((1, 1, 28, 28), np.float32), 1, timeout_s=200)
    assert time.monotonic() - start < 60


def _rows() -> list[dict]:
    row = {"model": "budget_quarter", "protocol": "fss-compact", "profile": "rtt=4ms,bw=1gbit", "batch": 1, "latency_s": 0.1234,
           "lower_bound_s": 0.05, "latency_over_lower_bound": 2.47, "rounds": 19, "bytes_online": 12.5e6, "relu_per_sample": 12416,
           "samples_per_s": 8.1}  # fmt: skip
    return [row, row | {"protocol": "crypten", "profile": "wan", "batch": 16}]


def test_the_sweep_table_stands_whole_in_80_columns():
    import io

    from rich.console import Console

    from twinfer.deploy.bench.sweep import HEADER, sweep_table

    buf = io.StringIO()
    Console(file=buf, width=80).print(sweep_table(_rows()))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    words = text.split()
    assert all(word in words for column in HEADER for word in column.split())  # every header, none cut
    for value in ("12416", "8.10", "0.123", "2.47", "12.50", "fss-comp", "rtt=4ms"):  # every column's cells, folded not cut
        assert value in text, value


def test_a_sweep_of_one_batch_size_still_shows_the_lower_bound():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from twinfer.deploy.bench.sweep import draw_series

    fig, ax = plt.subplots()
    draw_series(ax, [(1, 0.12, 0.05)], "m (fss-compact)", bound=True)
    measured, bound = ax.lines
    assert list(bound.get_ydata()) == [0.05] and bound.get_marker() not in ("None", "", None, " ")
    plt.close(fig)
