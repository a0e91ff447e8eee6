"""The committed reference models load offline and still reach the figures on their model cards."""

import json

import pytest
import torch

from kvcal.data import artifacts_root, bundled_corpus, load_texts, token_stream
from kvcal.eval.retrieval import NeedleProbe, needle_accuracy
from kvcal.eval.scoring import evict_middle
from kvcal.models import load_model

MODELS = ["kvcal-ref-llama", "kvcal-ref-qwen3"]


@pytest.fixture(scope="module", params=MODELS)
def reference(request):
    model_dir = artifacts_root() / request.param
    card = json.loads((model_dir / "model_card.json").read_text())
    model, tok = load_model(model_dir, "cpu")
    return model_dir, card, model, tok


def test_loads_offline_from_local_dir(reference, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, card, _, _ = reference
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.head_dim == 64 and cfg.num_hidden_layers >= 6


@torch.no_grad()
def test_heldout_loss_matches_card_and_beats_unigram(reference):
    _, card, model, tok = reference
    seq = card["seq_len"]
    stream = token_stream(tok, load_texts([bundled_corpus("eval")]))
    windows = stream[: (stream.numel() // seq) * seq].view(-1, seq)[: card["heldout_windows"]]
    loss = sum(float(model(input_ids=w[None], labels=w[None]).loss) for w in windows) / windows.shape[0]
    assert abs(loss - card["heldout_loss"]) < 0.01
    assert loss < card["unigram_heldout_loss"] - 1.0


def test_model_uses_the_middle_of_its_context(reference):
    _, card, model, tok = reference
    trials = NeedleProbe(context_len=card["seq_len"], trials=8, seed=1).build(tok, load_texts([bundled_corpus("eval")]))
    full = needle_accuracy(model, trials)
    evicted = needle_accuracy(model, trials, lambda c: evict_middle(c, 4, 128))
    assert full >= 0.9 and evicted < 0.3, (full, evicted)
