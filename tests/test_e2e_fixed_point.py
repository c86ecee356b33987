"""Scaled inputs, 0-255 models and bad weights on every path: right within the stated error, or
refused before any share is sent (exit 4) or when the model is loaded (exit 3); never a wrong
answer with exit 0. Real processes over gRPC: `private_inference` / `twinfer infer` (Ray, three
actors), three `twinfer party` processes, `twinfer serve` + `twinfer query`."""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers.party_processes import Parties
from twinfer.deploy.launch.wiring import new_session_id
from tests.helpers.stated import assert_within_stated_error
from twinfer.deploy.launch.inference import private_inference
from twinfer.parties.errors import InputError
from twinfer.protocols.backends import protocols
from twinfer.parties.runtime.session_spec import SessionSpec

pytestmark = pytest.mark.timeout(600)

COMPUTED, REFUSED = (1e4, 1e9), 1e18  # the demo CNN's inputs times these (1e6: at 16 bits, below)


def _reference(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():  # a double copy: .double() converts in place, and the model is a shared fixture
        return copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()


@pytest.fixture(scope="module")
def images(fashion_test) -> np.ndarray:
    return fashion_test[0][:4]


@pytest.fixture
def parties(tmp_path):
    p = Parties(tmp_path)
    yield p
    p.close()


def test_where_one_process_holds_both_each_scale_is_computed_within_the_stated_error_or_refused(cache, onnx_files, fashion_cnn, images):
    """--fraction-bits auto picks, for the inputs at hand, the most bits that hold them: 1e4 times the
    images runs at fewer bits with every truncation local; 1e9 needs every layer's truncation exact, on
    62 to 64 bits; at 1e18 the values leave the ring at every number of bits: refused before Ray. One
    backend per scale, both in turn."""
    import ray

    for scale, protocol in zip(COMPUTED, ("crypten", "fss")):
        x = (images * scale).astype(np.float32)
        result = private_inference(onnx_files["fashion_cnn"], x, spec=SessionSpec(protocol=protocol), batch_size=4)
        summary = result.summary()
        assert "the most that hold every value" in summary["fraction_bits_chosen"]
        assert (summary["exact_truncations"] > 0) == (scale > 1e4), summary["truncation"]
        error = assert_within_stated_error(result.logits, _reference(fashion_cnn, x), summary)
        assert summary["stated_error"] <= 10 * max(error, 2.0 ** -summary["fraction_bits"])  # close to the truth
        assert summary["truncation_failure_per_sample"] <= 1e-6 and summary["stated_error_source"] == "simulated on these 4 inputs"
    start = time.monotonic()
    with pytest.raises(InputError) as info:
        private_inference(onnx_files["fashion_cnn"], images * REFUSED, spec=SessionSpec(protocol="crypten"))
    assert not ray.is_initialized() and time.monotonic() - start < 30  # no Ray, no party, no share
    text = str(info.value)
    assert "refused before any share is sent" in text and "No number of fractional bits holds these values" in text


def test_sixteen_bits_hold_1e6_with_exact_truncations_and_name_what_to_do_at_1e9(onnx_files, fashion_cnn, images):
    """At a fixed 16 bits the local truncation's risk at 1e6 is refused unless truncations are exact,
    which --truncation auto makes them; 1e9 wraps: the refusal names the bits that would hold it."""
    x = (images * 1e6).astype(np.float32)
    result = private_inference(onnx_files["fashion_cnn"], x, spec=SessionSpec(protocol="fss", fraction_bits=16), batch_size=4)
    summary = result.summary()
    assert summary["fraction_bits"] == 16 and summary["exact_truncations"] >= 1 and summary["truncation_failure_per_sample"] <= 1e-6
    assert_within_stated_error(result.logits, _reference(fashion_cnn, x), summary)
    with pytest.raises(InputError, match="above the 0.0001 allowed: use --truncation auto or exact"):
        private_inference(onnx_files["fashion_cnn"], x, spec=SessionSpec(protocol="fss", fraction_bits=16, truncation="local"))
    with pytest.raises(InputError, match=r"wraps around .* With --fraction-bits \d+ these values fit"):
        private_inference(onnx_files["fashion_cnn"], images * 1e9, spec=SessionSpec(fraction_bits=16))


def test_the_cli_refuses_with_exit_code_4(tmp_path, onnx_files, images):
    np.save(tmp_path / "x.npy", images * REFUSED)
    proc = subprocess.run(
        [sys.executable, "-m", "twinfer.deploy.cli", "infer", "--model", str(onnx_files["fashion_cnn"]), "--input", str(tmp_path / "x.npy"),
         "--protocol", "fss"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 4 and "refused before any share is sent" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("protocol", protocols())
def test_a_cnn_on_raw_0_255_pixels_runs_at_the_default_settings(pixel_cnn, fashion_test, protocol):
    """The model a new user brings (BatchNorm after each ReLU, 0-255 inputs, products in the hundreds)
    runs with no flag, within an error stated close to the measured one."""
    x = (fashion_test[0][:8] * 255).astype(np.float32)
    result = private_inference(pixel_cnn, x, spec=SessionSpec(protocol=protocol), batch_size=8)
    summary = result.summary()
    reference = _reference(pixel_cnn, x)
    error = assert_within_stated_error(result.logits, reference, summary)
    assert summary["stated_error"] <= 10 * error and (result.logits.argmax(1) == reference.argmax(1)).all()
    assert summary["input_range_held"] == [0.0, 255.0] and summary["truncation_failure_per_sample"] <= 1e-6


def test_on_the_party_path_a_client_refuses_what_its_server_cannot_hold_and_gets_the_error_stated_for_its_range(
    parties, tmp_path, onnx_files, fashion_cnn, images
):
    """A hand-started server of a model without a declared range holds the widest range its checks
    accept and says so at the handshake (two sessions on one listener): a client with inputs beyond it
    sends nothing and exits 4 naming the range; one within it gets the logits within the error stated
    for the narrowest of the server's ranges holding its input."""
    sessions = [new_session_id(), new_session_id()]
    dealer = parties._start("dealer", session=",".join(sessions)).wait_address(60)
    server = parties._start("server", "--model", str(onnx_files["fashion_cnn"]), "--dealer", dealer, session=",".join(sessions)).wait_address(60)
    np.save(tmp_path / "big.npy", images * 1e4)
    parties.start_client(server, tmp_path / "big.npy", "--dealer", dealer, session=sessions[0])
    code, _, err = parties.finish("client")
    assert code == 4 and "outside" in err and "what the server's model holds at 16 fractional bits" in err and "Traceback" not in err
    np.save(tmp_path / "x.npy", images)
    parties.start_client(server, tmp_path / "x.npy", "--dealer", dealer, "--output", str(tmp_path / "y.npy"), session=sessions[1])
    code, report, err = parties.finish("client")
    assert code == 0, err
    encoding = report["encoding"]
    error = assert_within_stated_error(np.load(tmp_path / "y.npy"), _reference(fashion_cnn, images), encoding)
    assert encoding["stated_error"] <= 10 * error and "simulated on inputs drawn from [0, " in encoding["stated_error_source"]
    assert parties.finish("server")[0] != 0  # the first session ended on every party, with the client's error


def test_a_non_finite_weight_is_refused_when_the_model_is_loaded(tmp_path, fashion_test):
    from twinfer.protocols.passes.onnx_export import export_onnx

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        model[1].weight[3, 7] = float("nan")
    (tmp_path / "nan.onnx").write_bytes(export_onnx(model, torch.zeros(1, 1, 28, 28)))
    np.save(tmp_path / "x.npy", fashion_test[0][:2])
    cli = [sys.executable, "-m", "twinfer.deploy.cli"]
    infer = subprocess.run([*cli, "infer", "--model", str(tmp_path / "nan.onnx"), "--input", str(tmp_path / "x.npy")],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert infer.returncode == 3 and "initializer '1.weight' holds 1 NaN or infinite value(s)" in infer.stderr, infer.stderr
    server = subprocess.run([*cli, "party", "--role", "server", "--session", "s" * 32, "--model", str(tmp_path / "nan.onnx"),
                             "--dealer", "127.0.0.1:9"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert server.returncode == 3 and "NaN or infinite" in server.stderr and "Traceback" not in server.stderr
