"""AutoReP pieces (STE, hysteresis, DaPa, hinge), the artifact round trip and its rejections,
and an optimized model run privately by `twinfer infer` against its plaintext masked model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twinfer.optimizer.autorep.autorep import AutoRepConfig, BudgetError, budget_hinge, optimize_relus, relu_count, relu_sites_model, sites
from twinfer.optimizer.autorep.masked_relu import MaskedReLU, dapa_coefficients, hysteresis, ste_mask
from twinfer.optimizer.common.artifact import export_artifact
from twinfer.parties.errors import ModelError
from twinfer.parties.runtime.model_file import load_model
from twinfer.protocols.passes.plain import run_plain


def test_ste_forward_is_the_mask_and_backward_scales_by_softplus():
    aux = torch.tensor([-2.0, 0.0, 0.5, 3.0], requires_grad=True)
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    out = ste_mask(aux, mask)
    assert torch.equal(out, mask)
    upstream = torch.tensor([1.0, -2.0, 0.5, 4.0])
    out.backward(upstream)
    assert torch.allclose(aux.grad, upstream * F.softplus(aux.detach()))


def test_hysteresis_keeps_until_below_minus_t_and_revives_only_above_t():
    t = 0.01
    aux = torch.tensor([0.005, -0.005, -0.02, 0.005, 0.02, -0.02])
    old = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert hysteresis(old, aux, t).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (1.0, 2.0), (-0.5, 0.3), (2.0, 0.5)])
def test_dapa_closed_form_matches_a_numeric_least_squares_fit(mu, sigma):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, generator=generator, dtype=torch.float64) * sigma + mu
    design = torch.stack([torch.ones_like(x), x, x * x], 1)
    numeric = torch.linalg.lstsq(design, torch.relu(x).unsqueeze(1)).solution.squeeze()
    closed = dapa_coefficients(torch.tensor([mu]), torch.tensor([sigma]))[0].double()
    assert torch.allclose(closed, numeric, atol=0.01 * max(1.0, sigma)), (closed, numeric)


def test_dapa_takes_the_standard_deviation_not_the_variance():
    # For N(0, 4) the right fit scales as 1/sigma = 0.5 in c2; passing the variance gives 1/4.
    c = dapa_coefficients(torch.tensor([0.0]), torch.tensor([2.0]))[0]
    assert abs(c[2].item() - 0.1995 / 2) < 1e-3 and abs(c[1].item() - 0.5) < 1e-4


def _tiny_masked(budget: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    return relu_sites_model(model, torch.randn(2, 1, 4, 4), AutoRepConfig(relu_budget=budget))


def test_budget_hinge_is_zero_within_budget_and_pushes_aux_down_above_it():
    model = _tiny_masked()
    total = sum(s.elements() for s in sites(model))
    assert total == 2 * 16 + 8 and relu_count(model) == total
    assert budget_hinge(model, total).item() == 0.0
    hinge = budget_hinge(model, 10)
    assert hinge.item() == pytest.approx((total - 10) / total)
    hinge.backward()
    for s in sites(model):
        assert (s.aux.grad > 0).all()  # gradient descent lowers every aux: ReLUs go


def test_a_relu_module_shared_by_two_sites_is_refused():
    relu = torch.nn.ReLU()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), relu, torch.nn.Linear(4, 4), relu)
    with pytest.raises(ValueError, match="several sites"):
        relu_sites_model(model, torch.randn(2, 4), AutoRepConfig(relu_budget=1))


def test_impossible_budgets_are_named():
    with pytest.raises(BudgetError, match=">= 0"):
        AutoRepConfig(relu_budget=-1)
    with pytest.raises(BudgetError, match="no nn.ReLU"):
        relu_sites_model(torch.nn.Sequential(torch.nn.Linear(4, 2)), torch.randn(2, 4), AutoRepConfig(relu_budget=1))


def _randomize_masks(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for s in sites(model):
        s.mask.copy_((torch.rand(s.mask.shape, generator=generator) < 0.3).float())
        s.coeffs.data[:, 2] = 0.3
        s.coeffs.data[:, 1] = 0.6


def test_artifact_round_trip_matches_the_masked_torch_model(tmp_path):
    model = _tiny_masked()
    _randomize_masks(model)
    model.eval()
    x = torch.randn(5, 1, 4, 4)
    out = export_artifact(model, x[:1], tmp_path / "a", {"dataset": "none", "seed": 0})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["relu_count"] == relu_count(model) > 0
    assert manifest["format"] == "twinfer-artifact" and manifest["twinfer_version"]
    graph, weights = load_model(out)
    assert graph.relu_count() == relu_count(model)
    assert [n.op for n in graph.nodes].count("MaskedRelu") == 2
    with torch.no_grad():
        plain = run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, x)
        assert torch.allclose(plain, model(x), atol=1e-5)


@pytest.fixture
def artifact(tmp_path):
    model = _tiny_masked()
    _randomize_masks(model)
    return export_artifact(model, torch.randn(1, 1, 4, 4), tmp_path / "a", {"dataset": "none", "seed": 0})


def _rewrite_tensors(path, change) -> None:
    """Edit the site arrays and fix the digest, so only the consistency checks can object."""
    from safetensors.numpy import load, save

    from twinfer.protocols.artifact import digest

    tensors = load((path / "tensors.safetensors").read_bytes())
    change(tensors)
    data = save(tensors)
    (path / "tensors.safetensors").write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sha256"]["tensors.safetensors"] = digest(data)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_tampered_file_is_rejected(artifact):
    data = bytearray((artifact / "tensors.safetensors").read_bytes())
    data[-1] ^= 1
    (artifact / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="tensors.safetensors does not match the digest"):
        load_model(artifact)


def test_a_mask_that_does_not_fit_its_layer_is_rejected(artifact):
    def shrink(tensors):
        key = next(k for k in tensors if k.endswith("/mask") and tensors[k].ndim == 3)
        tensors[key] = np.zeros((2, 3, 3), dtype=np.uint8)

    _rewrite_tensors(artifact, shrink)
    with pytest.raises(ModelError, match=r"has shape \(2, 3, 3\), but the layer's activation is \(2, 4, 4\)"):
        load_model(artifact)


def test_a_relu_count_different_from_the_manifest_is_rejected(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["relu_count"] += 1
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="but the manifest says"):
        load_model(artifact)


def test_a_site_count_different_from_the_manifest_is_rejected(artifact):
    _rewrite_tensors(artifact, lambda t: t.__setitem__(next(k for k in t if k.endswith("/mask")), np.ones_like(t[next(k for k in t if k.endswith("/mask"))])))
    with pytest.raises(ModelError, match="keeps .* ReLUs, but the manifest says"):
        load_model(artifact)


def test_missing_files_and_foreign_manifests_are_named(artifact):
    other = artifact.parent / "b"
    shutil.copytree(artifact, other)
    (other / "model.onnx").unlink()
    with pytest.raises(ModelError, match="lacks model.onnx"):
        load_model(other)
    (artifact / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelError, match="not a twinfer artifact manifest"):
        load_model(artifact)


def test_channel_granularity_keeps_whole_channels():
    model = _tiny_masked()
    site = sites(model)[0]
    assert site.elements() == 32
    coarse = MaskedReLU(granularity="channel")
    coarse.materialize(torch.randn(2, 2, 4, 4))
    coarse.mask[1] = 0
    assert coarse.kept() == 16 and coarse.site().mask[0].all() and not coarse.site().mask[1].any()


def test_mask_search_meets_the_budget_and_keeps_the_best_checkpoint(fashion_cnn, fashion_test):
    images, labels = fashion_test
    config = AutoRepConfig(relu_budget=2000, epochs=2, batch_size=64, evals_per_epoch=2)
    result = optimize_relus(fashion_cnn, (images[:1200], labels[:1200]), (images[1200:1600], labels[1200:1600]), config, progress=False)
    assert result.relu_total == 9472
    assert result.relu_count <= 2000 and relu_count(result.model) == result.relu_count
    assert any(h["searching"] for h in result.history) and not result.history[-1]["searching"]
    assert result.val_accuracy == max(h["val_accuracy"] for h in result.history if not h["searching"] and h["relu_count"] <= 2000)
    with pytest.raises(BudgetError, match="was not met"):
        optimize_relus(fashion_cnn, (images[:256], labels[:256]), (images[:64], labels[:64]), AutoRepConfig(relu_budget=5, epochs=1, batch_size=128), progress=False)


@pytest.mark.timeout(400)
def test_optimized_model_runs_privately_with_only_kept_relus_compared(tmp_path, onnx_files, fashion_test):
    """`twinfer optimize` then `twinfer infer` on the artifact: three party processes over gRPC."""
    images = fashion_test[0][:24]
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "cnn-1500"
    run = lambda *a: subprocess.run([sys.executable, "-m", "twinfer.deploy.cli", *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    opt = run(
        "optimize", "--model", str(onnx_files["fashion_cnn"]), "--data", "fashion-mnist", "--relu-budget", "1500",
        "--train-samples", "1500", "--epochs", "2", "--out", str(out), "--json", "--comparison-bits", "auto",
    )  # fmt: skip
    assert opt.returncode == 0, opt.stderr[-3000:]
    manifest = json.loads(opt.stdout)
    assert 0 < manifest["relu_count"] <= 1500 and manifest["budget"] == 1500
    assert {"accuracy_before", "accuracy_after", "dataset", "seed", "twinfer_version"} <= set(manifest)
    widths = manifest["comparison_bits"]  # per comparison, from the training data's ranges (x 4)
    assert widths and all(2 <= b <= 64 for b in widths.values()) and min(widths.values()) < 40
    assert manifest["comparison_calibration"]["margin"] == 4.0 and "risk" in manifest["comparison_calibration"]
    proc = run("infer", "--model", str(out), "--input", str(tmp_path / "x.npy"), "--batch", "12", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    graph, weights = load_model(out)
    with torch.no_grad():
        plain = run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, torch.from_numpy(images)).numpy()
    logits = np.array(result["logits"])
    assert (logits.argmax(1) == plain.argmax(1)).all()
    assert np.abs(logits - plain).max() < 0.05
    # Only kept positions went through the comparison protocol: 24 samples x the manifest's count.
    assert result["relu_count"] == 24 * manifest["relu_count"]
    # The same artifact on the fss backend: the same ReLUs compared, in one round each.
    proc = run("infer", "--model", str(out), "--input", str(tmp_path / "x.npy"), "--batch", "12", "--protocol", "fss", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_fss = json.loads(proc.stdout)
    assert on_fss["protocol"] == "fss" and on_fss["relu_count"] == 24 * manifest["relu_count"]
    fss_logits = np.array(on_fss["logits"])
    assert (fss_logits.argmax(1) == plain.argmax(1)).all() and np.abs(fss_logits - plain).max() < 0.05
    assert on_fss["rounds_per_batch"] < result["rounds_per_batch"]
