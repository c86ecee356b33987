"""The artifact as one type (protocols/artifact.py): the only reader and writer of its directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from twinfer.optimizer.common.artifact import export_artifact
from twinfer.protocols.artifact import MANIFEST_FILE, PEAKS_FILE, Artifact, ArtifactError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def written(tmp_path) -> Path:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    return export_artifact(model, torch.randn(1, 1, 4, 4), tmp_path / "a", {"dataset": "none", "seed": 0}, calibration=torch.randn(8, 1, 4, 4).numpy())


def test_read_write_round_trips_and_a_section_survives_the_digests(written, tmp_path):
    artifact = Artifact.read(written)
    assert set(artifact.files) == {"model.onnx", "tensors.safetensors", PEAKS_FILE}
    assert artifact.graph().relu_count() == artifact.manifest["relu_count"] == 32
    copy = artifact.with_sections(cost_predicted={"total_s": 1.5}).write(tmp_path / "b")
    again = Artifact.read(copy)
    assert again.manifest["cost_predicted"] == {"total_s": 1.5} and again.files == artifact.files
    assert "cost_predicted" not in Artifact.read(written).manifest  # with_sections does not change the original


def test_format_fields_are_not_sections_and_a_changed_file_is_not_written(written, tmp_path):
    artifact = Artifact.read(written)
    with pytest.raises(ArtifactError, match=r"\['sha256'\] are the artifact's format fields"):
        artifact.with_sections(sha256={})
    artifact.files["model.onnx"] += b"\0"
    with pytest.raises(ArtifactError, match="model.onnx does not match the digest"):
        artifact.write(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_create_fills_the_format_fields_and_refuses_unnamed_peaks():
    artifact = Artifact.create({"relu_count": 0, "format": "forged"}, b"onnx", b"tensors")
    assert artifact.manifest["format"] == "twinfer-artifact" and set(artifact.manifest["sha256"]) == {"model.onnx", "tensors.safetensors"}
    artifact.verify()
    with pytest.raises(ArtifactError, match="peaks_file"):
        Artifact.create({}, b"onnx", b"tensors", peaks=b"peaks")


def test_read_names_the_directory_and_the_problem(written, tmp_path):
    assert not Artifact.is_artifact(tmp_path) and Artifact.is_artifact(written)
    (written / PEAKS_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"artifact {re.escape(str(written))}: lacks {PEAKS_FILE}"):
        Artifact.read(written)
    (written / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot be read as JSON"):
        Artifact.read(written)


def test_no_module_but_the_artifacts_opens_its_files():
    pattern = re.compile(r"manifest\.json|MANIFEST_FILE|TENSORS_FILE|PEAKS_FILE|artifact_files|check_manifest")
    openers = sorted(
        str(path.relative_to(ROOT))
        for folder in ("protocols", "parties", "optimizer", "deploy", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if path != ROOT / "protocols" / "artifact.py"
        and any(pattern.search(line) and not line.lstrip().startswith(("#", '"', "p.add_argument")) for line in path.read_text().splitlines())
    )
    assert not openers, f"{openers} read or write the artifact's files themselves; use protocols.artifact.Artifact"
