"""The numeric range check (protocols/passes/ranges.py): every layer's values against what f
fractional bits hold, the failure probability of the two-party truncation, the stated error,
and fractional bits as a session parameter. In process; the launch path is in test_launch_checks.py."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from tests.test_backends import CASES, _graph, run_two_party
from twinfer.protocols.backends import backend_class, protocols
from twinfer.protocols.backends.fss import ring
from twinfer.protocols.passes.onnx_export import export_onnx
from twinfer.protocols.passes.plain import run_plain
from twinfer.protocols.passes.encoding import check_encoding, encoding_report
from twinfer.protocols.passes.ranges import interval_ranges, observed_ranges
from twinfer.parties.runtime.model_file import parse_model
from twinfer.parties.runtime.session_spec import SessionSpec


@pytest.fixture(scope="module")
def cnn(fashion_cnn):
    return parse_model(export_onnx(fashion_cnn, torch.zeros(1, 1, 28, 28)))


@pytest.fixture(scope="module")
def resnet(tiny_resnet):
    return parse_model(export_onnx(tiny_resnet, torch.zeros(1, 1, 28, 28)))


def _reference(graph, weights, x: np.ndarray) -> np.ndarray:
    return run_plain(graph, {k: torch.from_numpy(v).double() for k, v in weights.items()}, torch.from_numpy(x).double()).numpy()


# -- the analysis ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["cnn", "resnet"])
def test_the_interval_bound_holds_for_every_input_in_the_range(request, model, fashion_test):
    graph, weights = request.getfixturevalue(model)
    bound = interval_ranges(graph, weights, (0.0, 1.0))
    rng = np.random.default_rng(0)
    samples = np.concatenate([
        fashion_test[0][:32], rng.random((32, 1, 28, 28), dtype=np.float32),
        np.zeros((1, 1, 28, 28), np.float32), np.ones((1, 1, 28, 28), np.float32),
    ])  # fmt: skip
    seen = observed_ranges(graph, weights, samples)
    assert bound.sound and not seen.sound
    for name, peak in seen.peaks.items():
        assert torch.all(peak <= bound.peaks[name] * (1 + 1e-5) + 1e-5), name
    for table in ("truncated", "compared"):
        for node, value in getattr(seen, table).items():
            assert value <= getattr(bound, table)[node] * (1 + 1e-5) + 1e-5, (table, node)
    # and it is not vacuous: images reach a fair part of it (the CNN; the resnet's bound is far looser)
    out = graph.output_name
    assert model == "resnet" or float(seen.peaks[out].max()) > 0.01 * float(bound.peaks[out].max())


def test_the_interval_bound_of_every_op_case():
    """Each op's bound (polynomial sites, clips, pools, concat, affine, add) holds on random inputs."""
    for name, (shape, nodes, weights) in CASES.items():
        graph = _graph(shape, nodes, weights)
        bound = interval_ranges(graph, weights, (-2.0, 2.0))
        x = (np.random.default_rng(1).random((64, *shape)) * 4 - 2).astype(np.float32)
        seen = observed_ranges(graph, weights, x)
        for value, peak in seen.peaks.items():
            assert torch.all(peak <= bound.peaks[value] + 1e-5), (name, value)


def test_the_stated_probability_is_that_of_the_local_truncation():
    """Shares of V (ring units) truncate wrongly with probability |V| / 2^64: the formula the check sums."""
    rng = np.random.default_rng(2)
    trials = 200_000
    for value, expected in ((1 << 58, 2.0**-6), (1 << 40, 2.0**-24)):
        x1 = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, trials, dtype=np.int64, endpoint=True))
        x0 = torch.full((trials,), value, dtype=torch.int64) - x1  # wraps as the ring does
        total = ring.truncate(x0, 0) + ring.truncate(x1, 1)
        wrong = int((torch.abs(total - (value >> ring.FRACTION_BITS)) > 1).sum())
        sigma = (trials * expected) ** 0.5
        assert abs(wrong - trials * expected) < 5 * sigma + 1, (value, wrong, trials * expected)


def test_the_failure_probability_sums_each_truncation(cnn, fashion_test):
    graph, weights = cnn
    x = fashion_test[0][:16]
    seen = observed_ranges(graph, weights, x)
    # by hand: every Conv/Gemm truncates its product (the output without its bias), once per element
    tw = {k: torch.from_numpy(v) for k, v in weights.items()}
    values, total = {graph.input_name: torch.from_numpy(x)}, 0.0
    from twinfer.protocols.ops import op_for

    for node in graph.nodes:
        args, w = [values[i] for i in node.inputs], [tw[k] for k in node.weights]
        if node.op in ("Conv", "Gemm"):
            total += float(op_for(node).plain(node, args, w[:1]).abs().sum()) / len(x)
        values[node.output] = op_for(node).plain(node, args, w)
    for f in (16, 12):
        report = check_encoding(graph, weights, seen, f)
        assert report.failure_probability == pytest.approx(total * 2.0 ** (2 * f - 64), rel=1e-4)


# c0, c1, c2 per channel: |c2| < 1 of both signs, and a constant channel (c2 = 0) that must stay exact
_SITE_COEFFS = [[0.05, 0.5, 0.08], [0.1, 0.4, -0.3], [0.5, 0.0, 0.0]]
_SITE_KEPT = [0, 5, 17]  # in channels 0 and 1 (16 elements each): channel 2 is polynomial throughout


def _masked_site(keep: list[int]):
    from twinfer.protocols.ir.graph import Node

    attrs = {"out_shape": [3, 4, 4], "keep": keep, "elements": len(keep), "coeffs": _SITE_COEFFS}
    return _graph((3, 4, 4), [Node("site", "MaskedRelu", ("x",), "y", (), attrs)], {})


def _site_terms(magnitude: np.ndarray, keep: list[int]) -> tuple[float, float]:
    """(old, new) truncated sums of the site's polynomial positions for inputs of these |x| (one sample's shape):
    old: x^2, then c2 x^2, then c1 x; new: z = sqrt(|c2|) x, z^2 = |c2| x^2, then c1 x (the sign is a negation)."""
    c = np.repeat(np.abs(np.asarray(_SITE_COEFFS)), 16, axis=0)
    rest = np.setdiff1d(np.arange(48), keep)
    x, c1, c2 = magnitude.reshape(-1)[rest], c[rest, 1], c[rest, 2]
    old = float((x * x + c2 * x * x + c1 * x).sum())
    new = float((np.sqrt(c2) * x + c2 * x * x + c1 * x).sum())
    return old, new


@pytest.mark.parametrize("keep", [_SITE_KEPT, []], ids=["fused", "polynomial_only"])
def test_a_masked_site_truncates_the_scaled_square_not_x_squared(keep):
    """The site squares z = sqrt(|c2|) x: it truncates |c2| x^2 where squaring x truncated x^2 and then
    c2 x^2 again, so at |x| = 10 and |c2| <= 0.3 its failure probability is several times smaller."""
    graph = _masked_site(keep)
    signs = np.where(np.random.default_rng(3).random((8, 3, 4, 4)) < 0.5, -1.0, 1.0)
    x = (10 * signs).astype(np.float32)
    old, new = _site_terms(np.full((3, 4, 4), 10.0), keep)
    assert 5 < old / new < 10  # per element (1 + |c2|) x^2 + |c1 x| against (sqrt|c2| + |c2| |x| + |c1|) |x|
    seen = observed_ranges(graph, {}, x)
    assert seen.truncated_sum["site"] == pytest.approx(new, rel=1e-6)
    for f in (16, 12):
        assert check_encoding(graph, {}, seen, f).failure_probability == pytest.approx(new * 2.0 ** (2 * f - 64), rel=1e-6)
    bound = interval_ranges(graph, {}, (-10.0, 10.0))  # the sound bound counts the same terms
    assert bound.truncated_sum["site"] == pytest.approx(new, rel=1e-6)


@pytest.mark.parametrize("protocol", protocols())
@pytest.mark.parametrize("keep", [_SITE_KEPT, []], ids=["fused", "polynomial_only"])
def test_a_masked_site_with_the_scaled_square_computes_within_the_stated_error(protocol, keep):
    graph = _masked_site(keep)
    x = (torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 4).numpy()
    report = encoding_report(graph, {}, observed_ranges(graph, {}, x), 16, protocol)
    assert report.refused == [], report.message()
    y = run_two_party(protocol, graph, {}, torch.from_numpy(x))[0].numpy()
    error = np.abs(y - _reference(graph, {}, x)).max()
    assert 0 < error <= report.error_bound, (error, report.error_bound)
    assert np.all(y[:, 2] == 0.5)  # c2 = 0 (and c1 = 0): z = 0, so its square is an exact 0

# -- what it refuses, and how it says so ------------------------------------------------------------------


def test_the_demo_cnn_at_its_own_scale_passes_with_a_small_stated_error(cnn, fashion_test):
    graph, weights = cnn
    report = check_encoding(graph, weights, observed_ranges(graph, weights, fashion_test[0][:64]))
    assert report.findings == [] and report.failure_probability < 1e-5 and report.error_bound < 0.01


def test_a_scale_the_truncation_cannot_take_is_refused_naming_the_layer(cnn, fashion_test):
    graph, weights = cnn
    report = check_encoding(graph, weights, observed_ranges(graph, weights, fashion_test[0][:16] * 1e4), 16)
    assert [f.node for f in report.refused] == ["/features/features.0/Conv"]
    text = report.message()
    assert "layer '/features/features.0/Conv' (Conv)" in text and "fails (off by 2^48 units) with probability |y| 2^-64" in text
    assert f"{report.failure_probability:.2g} per sample" in text and "above the 0.0001 allowed: use --truncation auto or exact" in text
    assert report.suggested_bits == 12 and "--fraction-bits 12" in text
    # where fewer bits hold the values, nothing is refused, and the stated error grows 2^16/2^12-fold
    fewer = check_encoding(graph, weights, observed_ranges(graph, weights, fashion_test[0][:16] * 1e4), 12)
    assert fewer.refused == [] and fewer.failure_probability == pytest.approx(report.failure_probability * 2.0**-8)
    assert 8 < fewer.error_bound / report.error_bound < 24


def test_a_product_that_wraps_is_refused_and_no_precision_holds_1e9(cnn, fashion_test):
    graph, weights = cnn
    seen = observed_ranges(graph, weights, fashion_test[0][:16] * 1e9)
    report = check_encoding(graph, weights, seen, 16)
    assert "wraps around beyond 2^31" in report.refused[0].problem and report.refused[0].node == "/features/features.0/Conv"
    assert report.suggested_bits is None and "No number of fractional bits holds these values" in report.message()
    coarse = check_encoding(graph, weights, seen, 4)  # the range fits, but the outputs would be noise
    assert any("too coarse to be an answer" in f.problem for f in coarse.refused)


def _copy(nodes):
    return [dataclasses.replace(n, attrs=copy.deepcopy(n.attrs)) for n in nodes]  # CASES stay as they are


def test_narrow_comparisons_and_max_pool_padding_are_checked():
    shape, nodes, weights = CASES["conv_relu"]
    graph = _graph(shape, _copy(nodes), weights)
    graph.nodes[1].attrs["bits"] = 20  # an artifact's width: exact below 2^(20-1-16) = 8
    seen = observed_ranges(graph, weights, np.full((1, *shape), 5.0, np.float32))
    assert check_encoding(graph, weights, seen, narrow_comparisons=False).refused == []  # crypten compares on 64 bits
    refused = check_encoding(graph, weights, seen, narrow_comparisons=True).refused
    assert refused and "a comparison on 20 bits is exact only below 2^3" in refused[0].problem
    pool = _graph((1, 4, 4), _copy(CASES["maxpool_avgpool"][1][:1]), {})
    pool.nodes[0].attrs["padding"] = [1, 1]
    low = observed_ranges(pool, {}, np.full((1, 1, 4, 4), -300.0, np.float32))
    assert "padding value -2^8" in check_encoding(pool, {}, low, pool_pad_bits=24).refused[0].problem  # CrypTen's pad
    assert check_encoding(pool, {}, low, pool_pad_bits=46).refused == []  # fss pads far lower


def test_a_sound_bound_warns_where_only_its_looseness_crosses(resnet):
    """The interval bound of the resnet over [0, 1] is far above what images do: with local truncations only,
    a warning, not a refusal; by default the layers carrying that risk truncate exactly instead."""
    graph, weights = resnet
    bound = interval_ranges(graph, weights, (0.0, 1.0))
    local = encoding_report(graph, weights, bound, 16, "crypten", truncation="local")
    assert local.refused == [] and local.warnings and "per sample over the layers truncated locally" in local.warnings[0].problem
    auto = encoding_report(graph, weights, bound, 16, "crypten")
    assert auto.refused == [] and auto.warnings == [] and auto.truncations
    assert auto.failure_probability <= 1e-4 < local.failure_probability


# -- fractional bits as a session parameter -------------------------------------------------------------


@pytest.mark.parametrize("protocol", protocols())
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_op_at_other_fraction_bits_within_the_stated_error(protocol, case):
    input_shape, nodes, weights = CASES[case]
    graph = _graph(input_shape, nodes, weights)
    x = (torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(7)) * 2).numpy()
    for bits in (10, 18):
        report = encoding_report(graph, weights, observed_ranges(graph, weights, x), bits, protocol)
        assert report.refused == [] and report.failure_probability < 1e-6  # a failed truncation would be a fluke
        stated = report.error_bound
        y = run_two_party(protocol, graph, weights, torch.from_numpy(x), fraction_bits=bits)[0].numpy()
        error = np.abs(y - _reference(graph, weights, x)).max()
        assert error <= stated, (bits, error, stated)
        assert error < 2.0 ** (4 - bits) * 8  # and the bits were really used: finer with more of them


def _polynomial_chain():
    """Three convs, each followed by an all-polynomial site (an AutoReP model's shape, no ReLU kept)."""
    from tests.test_backends import Node, _w

    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "group": 1}
    nodes, weights, x = [], {}, "x"
    for i in range(3):
        weights[f"w{i}"], weights[f"b{i}"] = _w(3, 3 if i else 2, 3, 3, seed=i) * 0.6, _w(3, seed=10 + i) * 0.1
        nodes.append(Node(f"conv{i}", "Conv", (x,), f"c{i}", (f"w{i}", f"b{i}"), conv))
        coeffs = [[0.05, 0.5, 0.25], [0.0, 0.6, 0.2], [0.1, 0.4, 0.3]]
        nodes.append(Node(f"poly{i}", "MaskedRelu", (f"c{i}",), f"p{i}", (), {"out_shape": [3, 6, 6], "keep": [], "elements": 0, "coeffs": coeffs}))
        x = f"p{i}"
    return _graph((2, 6, 6), nodes, weights), weights


@pytest.mark.parametrize("protocol", protocols())
def test_a_polynomial_chain_with_a_margin_is_not_refused_and_computes_within_the_stated_error(protocol):
    """The margin widens the range findings only: the error estimate uses the calibration samples'
    own peaks, not each polynomial's slope at margin x its peak, which compounds site after site."""
    graph, weights = _polynomial_chain()
    calibration = (torch.randn(64, 2, 6, 6, generator=torch.Generator().manual_seed(1))).numpy()
    ranges = observed_ranges(graph, weights, calibration).scaled(4.0)
    report = encoding_report(graph, weights, ranges, 16, protocol)
    assert report.refused == [], report.message()
    at_peaks = encoding_report(graph, weights, dataclasses.replace(ranges, observed={}), 16, protocol)
    assert at_peaks.error_bound > 20 * report.error_bound  # what the peaks alone would state
    x = calibration[:4]
    y = run_two_party(protocol, graph, weights, torch.from_numpy(x))[0].numpy()
    assert np.abs(y - _reference(graph, weights, x)).max() <= report.error_bound


@pytest.mark.parametrize("protocol", protocols())
def test_the_demo_cnn_scaled_computes_within_the_stated_error(protocol, cnn, fashion_test):
    graph, weights = cnn
    for scale, bits in ((1.0, 16), (1e4, 12), (1e6, 9)):
        x = (fashion_test[0][:4] * scale).astype(np.float32)
        report = encoding_report(graph, weights, observed_ranges(graph, weights, x), bits, protocol)
        assert report.refused == []
        y = run_two_party(protocol, graph, weights, torch.from_numpy(x), fraction_bits=bits)[0].numpy()
        assert np.abs(y - _reference(graph, weights, x)).max() <= report.error_bound, (scale, bits)


def test_parties_with_other_fraction_bits_are_refused_by_name():
    from twinfer.parties.errors import ProtocolError
    from twinfer.parties.runtime.session import ClientParty, PartyConfig
    from twinfer.protocols.roles import SERVER

    config = PartyConfig(spec=SessionSpec(fraction_bits=12), role="client", session_id="s", server_address="127.0.0.1:9", dealer_address="127.0.0.1:9")
    party = ClientParty(np.zeros((1, 4), np.float32), 1, config)
    party._agree_encoding(np.array([12]), SERVER)  # the same: accepted
    with pytest.raises(ProtocolError, match="the server encodes with 16 fractional bits but this client with 12: every party"):
        party._agree_encoding(np.array([16]), SERVER)
    auto = ClientParty(np.zeros((1, 4), np.float32), 1, dataclasses.replace(config, spec=config.spec.replace(fraction_bits="auto")))
    auto._agree_encoding(np.array([9]), SERVER)  # 'auto' takes the server's
    assert auto.fraction_bits == 9
    for bad in (0, 31, 2.5, "16"):
        with pytest.raises(ValueError, match="fraction bits must be 'auto' or an integer from 1 to 30"):
            PartyConfig(spec=SessionSpec(fraction_bits=bad), role="client", session_id="s")


@pytest.mark.parametrize("protocol", protocols())
def test_values_are_rounded_to_the_grid_and_revealed_exactly(protocol):
    """Encoding rounds to the nearest multiple of 2^-f (CrypTen's encoder alone cuts toward zero)
    and the reveal decodes exactly (CrypTen's decoder alone reads -511/2^8 as -2.996)."""
    from twinfer.protocols.ir.graph import Node

    graph = _graph((4,), [Node("same", "Reshape", ("x",), "y", (), {"shape": [0, -1]})], {})
    x = torch.tensor([[-511 / 256, 2.9 / 256, -2.9 / 256, 1000.5]])
    y = run_two_party(protocol, graph, {}, x, fraction_bits=8)[0]
    assert y.tolist() == [[-511 / 256, 3 / 256, -3 / 256, 1000.5]]


def test_an_artifacts_summary_keeps_the_observed_peaks_per_channel_apart_from_the_margin():
    from twinfer.protocols.passes.ranges import ranges_from_summary

    graph, weights = _polynomial_chain()
    x = (torch.randn(32, 2, 6, 6, generator=torch.Generator().manual_seed(2))).numpy()
    observed = observed_ranges(graph, weights, x)
    summary = observed.scaled(4.0).layer_summary(graph)
    per_channel = observed.peaks["c1"].reshape(3, -1).amax(dim=1)
    assert summary["conv1"]["observed"] == pytest.approx(per_channel.tolist(), rel=1e-5)
    assert summary["conv1"]["peak"] == pytest.approx(4 * float(per_channel.max()), rel=1e-5)
    restored = ranges_from_summary(graph, summary, (float(x.min()), float(x.max())), "calibration")
    assert torch.allclose(restored.observed["c1"][:, 0, 0], per_channel.to(torch.float64), rtol=1e-5)
    older = {name: {k: v for k, v in entry.items() if k != "observed"} for name, entry in summary.items()}
    assert ranges_from_summary(graph, older, (float(x.min()), float(x.max())), "calibration").observed == {}  # peaks stand in


# -- an artifact's per-element calibration peaks (calibration_peaks.safetensors) ------------------------------


def _polynomial_net() -> torch.nn.Module:
    """Three convs, each followed by a ReLU that the artifact turns into an all-polynomial site."""
    torch.manual_seed(3)
    layers = []
    for i in range(3):
        layers += [torch.nn.Conv2d(3 if i else 2, 3, 3, padding=1), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


def _peaked_inputs(n: int, seed: int) -> np.ndarray:
    """Inputs whose magnitude grows across the image: a channel's peak is far above most of its elements'."""
    ramp = torch.linspace(0.02, 3.0, 6).reshape(1, 1, 1, 6) * torch.linspace(0.1, 1.0, 6).reshape(1, 1, 6, 1)
    return (torch.randn(n, 2, 6, 6, generator=torch.Generator().manual_seed(seed)) * ramp).numpy()


@pytest.fixture
def peaks_artifact(tmp_path):
    """An artifact of `_polynomial_net` calibrated on `_peaked_inputs`; (directory, calibration samples)."""
    import onnx

    from twinfer.optimizer.common.artifact import write_artifact
    from twinfer.protocols.ops.activation import ActivationSite

    onnx_bytes = export_onnx(_polynomial_net(), torch.zeros(1, 2, 6, 6))
    relus = [n.name for n in onnx.load_from_string(onnx_bytes).graph.node if n.op_type == "Relu"]
    coeffs = np.array([[0.05, 0.5, 0.25], [0.0, 0.6, 0.2], [0.1, 0.4, 0.3]], np.float32)
    sites = {name: ActivationSite(mask=np.zeros((3, 6, 6), bool), coeffs=coeffs) for name in relus}
    calibration = _peaked_inputs(64, seed=4)
    return write_artifact(tmp_path / "art", onnx_bytes, {}, sites=sites, calibration=calibration, widths=False), calibration


def test_an_artifact_stores_per_element_peaks_and_the_server_rebuilds_them(peaks_artifact):
    import json

    from safetensors.numpy import load

    from twinfer.parties.runtime.model_file import load_model
    from twinfer.protocols import artifact as af
    from twinfer.protocols.passes.ranges import calibration_ranges

    out, calibration = peaks_artifact
    manifest = json.loads((out / af.MANIFEST_FILE).read_text())
    data = (out / af.PEAKS_FILE).read_bytes()
    assert manifest["activation_ranges"]["peaks_file"] == af.PEAKS_FILE and manifest["sha256"][af.PEAKS_FILE] == af.digest(data)
    assert all("observed" in entry for entry in manifest["activation_ranges"]["layers"].values())  # the summary stays
    graph, weights = load_model(out)
    assert set(load(data)) == {n.name for n in graph.nodes}
    seen = observed_ranges(graph, weights, calibration)
    restored = calibration_ranges(graph)
    for node in graph.nodes:
        assert restored.observed[node.output].shape == seen.observed[node.output].shape
        assert torch.allclose(restored.observed[node.output], seen.observed[node.output], rtol=1e-6, atol=0), node.name
        assert float(restored.peaks[node.output].max()) == pytest.approx(4 * float(seen.peaks[node.output].max()), rel=1e-5)


def test_tampered_missing_or_misshapen_peaks_are_refused_naming_file_and_layer(peaks_artifact):
    import json

    from safetensors.numpy import load, save

    from twinfer.parties.errors import ModelError
    from twinfer.parties.runtime.model_file import load_model
    from twinfer.protocols import artifact as af

    out, _ = peaks_artifact
    good = (out / af.PEAKS_FILE).read_bytes()
    tampered = bytearray(good)
    tampered[-1] ^= 1
    (out / af.PEAKS_FILE).write_bytes(bytes(tampered))
    with pytest.raises(ModelError, match="calibration_peaks.safetensors does not match the digest in manifest.json"):
        load_model(out)
    (out / af.PEAKS_FILE).unlink()
    with pytest.raises(ModelError, match="lacks calibration_peaks.safetensors"):
        load_model(out)
    peaks = load(good)
    layer = sorted(peaks)[1]
    peaks[layer] = peaks[layer][:1]  # one channel: the digest fixed, so only the shape check can object
    data = save(peaks)
    (out / af.PEAKS_FILE).write_bytes(data)
    manifest = json.loads((out / af.MANIFEST_FILE).read_text())
    manifest["sha256"][af.PEAKS_FILE] = af.digest(data)
    (out / af.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=rf"calibration_peaks.safetensors: the peaks of layer '{layer}' are float32 of shape \(1, 6, 6\); expected float32 of shape \(3, 6, 6\)"):
        load_model(out)
    del peaks[layer]
    data = save(peaks)
    (out / af.PEAKS_FILE).write_bytes(data)
    manifest["sha256"][af.PEAKS_FILE] = af.digest(data)
    (out / af.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=f"calibration_peaks.safetensors lacks the peaks of layer '{layer}'"):
        load_model(out)


def test_an_artifact_written_before_the_peaks_file_falls_back_to_per_channel_peaks(peaks_artifact):
    import json

    from twinfer.parties.runtime.model_file import check_model_range, load_model
    from twinfer.protocols import artifact as af
    from twinfer.protocols.passes.ranges import calibration_ranges

    out, _ = peaks_artifact
    manifest = json.loads((out / af.MANIFEST_FILE).read_text())
    del manifest["activation_ranges"]["peaks_file"], manifest["sha256"][af.PEAKS_FILE]
    (out / af.MANIFEST_FILE).write_text(json.dumps(manifest))
    (out / af.PEAKS_FILE).unlink()
    graph, weights = load_model(out)
    assert "peaks" not in graph.calibration
    restored = calibration_ranges(graph)
    for node in graph.nodes:
        per_channel = manifest["activation_ranges"]["layers"][node.name]["observed"]
        observed = restored.observed[node.output]
        assert torch.equal(observed, observed[:, :1, :1].expand_as(observed))  # one value per channel
        assert observed[:, 0, 0].tolist() == pytest.approx(per_channel)
    assert check_model_range(graph, weights, 16, "fss")[0].refused == []


@pytest.mark.parametrize("protocol", protocols())
def test_per_element_peaks_state_a_smaller_error_that_still_bounds_the_measured_one(peaks_artifact, protocol):
    """Spreading a channel's peak over all its elements overstates each polynomial's slope; the
    per-element peaks state less, still above what a two-party run errs by, and the optimizer's
    verdict (its artifact_graph) is the server's."""
    from twinfer.optimizer.mofhei.mofhei import artifact_graph
    from twinfer.parties.runtime.model_file import check_model_range, load_model
    from twinfer.protocols.passes.ranges import calibration_ranges, ranges_from_summary

    out, calibration = peaks_artifact
    graph, weights = load_model(out)
    c = graph.calibration
    per_channel = encoding_report(graph, weights, ranges_from_summary(graph, c["layers"], graph.input_range, c["source"]), 16, protocol)
    server, held = check_model_range(graph, weights, 16, protocol)
    assert held == graph.input_range and server.refused == [] and server.error_bound < 0.75 * per_channel.error_bound  # 2x less here
    optimizer = encoding_report(graph, weights, calibration_ranges(artifact_graph(out)), 16, protocol)
    assert optimizer.error_bound == server.error_bound and optimizer.failure_probability == server.failure_probability
    x = calibration[:4]
    y = run_two_party(protocol, graph, weights, torch.from_numpy(x))[0].numpy()
    assert np.abs(y - _reference(graph, weights, x)).max() <= server.error_bound


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_op_error_estimate_bounds_the_simulated_fixed_point_and_is_not_vacuous(case):
    """Each op's error method (its secure structure on error moments) against the fixed point itself,
    run on sampled inputs: the estimate holds what three simulated runs err by, within 100x of it."""
    from twinfer.protocols.passes.ranges import error_estimate, simulate

    input_shape, nodes, weights = CASES[case]
    graph = _graph(input_shape, nodes, weights)
    x = (np.random.default_rng(3).random((32, *input_shape)) * 4 - 2).astype(np.float32)
    seen = observed_ranges(graph, weights, x)
    reference = _reference(graph, weights, x)
    for f in (10, 16):
        estimate = error_estimate(graph, weights, seen, f)
        measured = max(np.abs(simulate(graph, weights, x, f, seed=s).outputs - reference).max() for s in range(3))
        assert measured <= estimate <= 100 * max(measured, 2.0**-f), (f, measured, estimate)


def test_the_simulation_is_what_the_parties_compute(cnn, fashion_test):
    """The fixed point without the shares errs as the two-party run does: the same deterministic encodings,
    truncations rounding stochastically; their errors are of one size (a factor 3 either way)."""
    from twinfer.protocols.passes.ranges import simulate

    graph, weights = cnn
    x = fashion_test[0][:16]
    reference = _reference(graph, weights, x)
    for protocol in protocols():
        simulated = np.abs(simulate(graph, weights, x, 12, public_rounding=backend_class(protocol).public_rounding).outputs - reference).max()
        y = run_two_party(protocol, graph, weights, torch.from_numpy(x), fraction_bits=12)[0].numpy()
        measured = np.abs(y - reference).max()
        assert simulated / 3 <= measured <= 3 * simulated, (protocol, simulated, measured)


def test_the_session_encoding_travels_as_checked_json_and_a_client_picks_its_narrowest_range():
    from twinfer.protocols.passes.encoding import SessionEncoding
    from twinfer.protocols.ir.graph import GraphError

    encoding = SessionEncoding(
        12, (-8.0, 8.0), 0.5, "simulated on 35 inputs drawn from [-8, 8]", 1e-7, {"conv": "exact, fused (40 bits)", "fc": "local"},
        "why", {"conv": {"kind": "exact", "bits": 40, "fused": True}}, ((-1.0, 1.0, 0.05), (0.0, 1.0, 0.02), (-4.0, 4.0, 0.2)),
    )  # fmt: skip
    back = SessionEncoding.from_json(encoding.to_json())
    assert back.plan == {} and dataclasses.replace(back, plan=encoding.plan) == encoding  # the plan travels in the graph
    assert back.for_inputs(np.array([0.1, 0.9])).stated_error == 0.02  # the narrowest range holding them
    assert back.for_inputs(np.array([-0.5, 0.9])).stated_error == 0.05
    assert back.for_inputs(np.array([-7.0, 0.0])).stated_error == 0.5  # only the held range holds it
    assert "inputs drawn from [0, 1]" in back.for_inputs(np.array([0.5])).error_source
    for bad in ('{"fraction_bits": 99}', "not json", encoding.to_json().replace('"failure_probability": 1e-07', '"failure_probability": 7')):
        with pytest.raises(GraphError):
            SessionEncoding.from_json(bad)
    assert back.summary()["exact_truncations"] == 1 and back.summary()["input_range_held"] == [-8.0, 8.0]
