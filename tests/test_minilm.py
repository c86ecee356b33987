"""The real encoder from its wheel (all-MiniLM-L6-v2) and real text (BBC News): tokenised on the
client, its mask public, it imports and runs in plaintext as PyTorch does. The private run is
`twinfer demo --model minilm` (and benchmarks/transformer.py); a test of it would take minutes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from twinfer.deploy.cli.cmd_infer import text_inputs
from twinfer.optimizer.data.text import BBC_CLASSES, headline, load_bbc_news, tokenize
from twinfer.optimizer.zoo.minilm import TOKENS, MiniLMClassifier, extract_minilm
from twinfer.parties.errors import InputError
from twinfer.protocols.passes.onnx_export import export_onnx
from twinfer.protocols.passes.onnx_import import graph_from_onnx
from twinfer.protocols.passes.plain import run_plain

pytestmark = pytest.mark.timeout(300)


def test_bbc_news_holds_its_five_classes():
    texts, labels = load_bbc_news()
    assert len(texts) == 2225 and np.bincount(labels).tolist() == [510, 386, 417, 511, 401] and len(BBC_CLASSES) == 5
    assert all(headline(t) for t in texts)


def test_headlines_are_tokenised_with_their_padding_masked(tmp_path_factory):
    folder = extract_minilm(tmp_path_factory.mktemp("models"))
    texts, _ = load_bbc_news()
    x = tokenize(folder / "tokenizer.json", [headline(texts[0]), texts[0]], TOKENS)
    kept = x["attention_mask"].sum(1)
    assert x["input_ids"].shape == (2, TOKENS) and 3 <= kept[0] < TOKENS and kept[1] == TOKENS
    assert (x["attention_mask"][0] == (np.arange(TOKENS) < kept[0])).all() and (x["input_ids"][0, kept[0] :] == 0).all()


def test_minilm_with_its_mask_imports_and_runs_as_pytorch_on_headlines(tmp_path_factory):
    folder = extract_minilm(tmp_path_factory.mktemp("models"))
    torch.manual_seed(0)
    model = MiniLMClassifier(folder, len(BBC_CLASSES)).eval()
    texts, _ = load_bbc_news()
    x = tokenize(folder / "tokenizer.json", [headline(t) for t in texts[::700]], TOKENS)
    onnx_bytes = export_onnx(model, (torch.zeros(1, TOKENS, dtype=torch.int64), torch.ones(1, TOKENS, dtype=torch.int64)), input_names=("input_ids", "attention_mask"))
    graph, weights = graph_from_onnx(onnx.load_from_string(onnx_bytes))
    ops = [n.op for n in graph.nodes]
    assert (ops.count("LayerNorm"), ops.count("Gelu"), ops.count("Softmax"), ops.count("PublicAdd")) == (13, 6, 6, 6)
    public = {k: torch.from_numpy(v) for k, v in graph.public_program.run({"attention_mask": x["attention_mask"]}).items()}
    got = run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, torch.from_numpy(x["input_ids"]).float(), public)
    with torch.no_grad():
        expected = model(torch.from_numpy(x["input_ids"]), torch.from_numpy(x["attention_mask"])).numpy()
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def test_infer_text_is_tokenised_to_the_models_length_with_its_mask(tmp_path_factory):
    """`twinfer infer --text FILE --tokenizer tokenizer.json`: one sentence a line, token ids and
    mask by the model's own input names, at its length; a model without a mask is refused."""
    from tests.test_transformers import Classifier, _export

    folder = extract_minilm(tmp_path_factory.mktemp("models"))
    tmp = tmp_path_factory.mktemp("text")
    (tmp / "s.txt").write_text("Markets rally as rates fall\n\nA very long line " + "word " * 40 + "\n")
    torch.manual_seed(0)
    for name, with_mask in (("masked", True), ("bare", False)):
        (tmp / f"{name}.onnx").write_bytes(_export(Classifier(layers=1).eval(), 17, with_mask=with_mask))
    x = text_inputs(str(tmp / "masked.onnx"), str(tmp / "s.txt"), str(folder / "tokenizer.json"))
    assert sorted(x) == ["attention_mask", "input_ids"] and x["input_ids"].shape == (2, 16)
    assert 3 <= x["attention_mask"][0].sum() < 16 and x["attention_mask"][1].sum() == 16  # padded, and cut to the model's 16
    with pytest.raises(InputError, match=r"this one takes \['input_ids'\]: without a mask its padding would be attended to"):
        text_inputs(str(tmp / "bare.onnx"), str(tmp / "s.txt"), str(folder / "tokenizer.json"))
    with pytest.raises(InputError, match=r"--text needs --tokenizer"):
        text_inputs(str(tmp / "masked.onnx"), str(tmp / "s.txt"), None)
