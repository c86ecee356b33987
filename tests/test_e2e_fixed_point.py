"""The demo CNN on inputs scaled by 1e4, 1e6 and 1e9, through the launch path (private_inference
and `twinfer infer`, Ray, three actors over gRPC), on every backend: each is either computed
within the stated error or refused before any party starts; never a wrong answer."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from twinfer.deploy.launch.inference import private_inference
from twinfer.parties.errors import InputError
from twinfer.protocols.backends import protocols

pytestmark = pytest.mark.timeout(600)

SCALES = {1e4: 12, 1e6: 9, 1e9: None}  # scale -> the fractional bits the check names (None: no number holds it)


def _reference(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():  # a double copy: .double() converts in place, and the model is a shared fixture
        return copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()


@pytest.fixture(scope="module")
def images(fashion_test) -> np.ndarray:
    return fashion_test[0][:4]


def test_with_the_default_encoding_every_scale_is_refused_before_any_party_starts(onnx_files, images):
    import ray

    for protocol in protocols():
        for scale, bits in SCALES.items():
            start = time.monotonic()
            with pytest.raises(InputError) as info:
                private_inference(onnx_files["fashion_cnn"], images * scale, protocol=protocol)
            assert not ray.is_initialized() and time.monotonic() - start < 10  # no Ray, no party, no share
            text = str(info.value)
            assert "the input is refused before any share is sent: with 16 fractional bits (these 4 inputs)" in text
            assert "layer '/features/features.0/Conv' (Conv)" in text
            if bits is None:
                assert "wraps around" in text and "No number of fractional bits holds these values" in text
            else:
                assert re.search(r"fails \(off by 2\^32\) with probability \|y\| 2\^-32, which sums to [0-9.e+-]+ per sample", text)
                assert f"With --fraction-bits {bits} these values fit" in text


def test_the_cli_refuses_with_exit_code_4(tmp_path, onnx_files, images):
    np.save(tmp_path / "x.npy", images * 1e9)
    proc = subprocess.run(
        [sys.executable, "-m", "twinfer.deploy.cli", "infer", "--model", str(onnx_files["fashion_cnn"]), "--input", str(tmp_path / "x.npy"),
         "--protocol", "fss"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 4 and "refused before any share is sent" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("protocol", protocols())
def test_with_the_bits_the_check_names_each_scale_is_computed_within_the_stated_error(cache, protocol, onnx_files, fashion_cnn, images):
    ray_folders = set((cache / "ray").glob("session_*"))
    for scale, bits in SCALES.items():
        if bits is None:
            continue
        x = (images * scale).astype(np.float32)
        result = private_inference(onnx_files["fashion_cnn"], x, protocol=protocol, fraction_bits=bits, batch_size=4)
        summary = result.summary()
        error = np.abs(result.logits - _reference(fashion_cnn, x)).max()
        assert summary["fraction_bits"] == bits and summary["protocol"] == protocol
        assert error <= summary["stated_error"], (scale, error, summary["stated_error"])
        assert summary["truncation_failure_per_sample"] < 1e-4
    # every run removed its Ray session folder from the project cache (another live process's may appear)
    left = [p.name for p in set((cache / "ray").glob("session_*")) - ray_folders if not _live(p)]
    assert left == []


def _live(folder) -> bool:
    """A folder of another process's Ray (another test run on this machine) is left alone."""
    import os

    pid = folder.name.rsplit("_", 1)[-1]
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    return pid != str(os.getpid())
