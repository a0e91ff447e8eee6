"""The shipped artifacts of both reference models: round trips at several ratios and generate() with KVTCCache."""

import pytest
import torch

import kvcal
from kvcal.cache import KVTCCache
from kvcal.data import artifacts_root, bundled_corpus, load_texts, token_stream
from kvcal.models import load_model

MODELS = ["kvcal-ref-llama", "kvcal-ref-qwen3"]


@pytest.fixture(scope="module", params=MODELS)
def reference(request):
    model_dir = artifacts_root() / request.param
    model, tok = load_model(model_dir, "cpu")
    stream = token_stream(tok, load_texts([bundled_corpus("eval")]))
    return model_dir, model, tok, stream


@torch.no_grad()
def test_round_trip_at_several_ratios(reference):
    model_dir, model, _, stream = reference
    ids = stream[5000:6024][None]
    cache = model(input_ids=ids, use_cache=True).past_key_values
    errors = []
    for ratio in (8, 16, 32):
        codec = kvcal.load(model_dir, ratio=ratio, model=model)
        blob = codec.compress(cache)
        stats = codec.stats(blob)
        assert stats["middle_ratio"] >= 0.9 * ratio, (ratio, stats["middle_ratio"])
        restored = codec.decompress(blob)
        err = 0.0
        for a, b in zip(cache.layers, restored.layers):
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                assert torch.equal(x[:, :, : codec.sink], y[:, :, : codec.sink])
                assert torch.equal(x[:, :, -codec.window :], y[:, :, -codec.window :])
                mid = slice(codec.sink, x.shape[2] - codec.window)
                err = max(err, float((x[:, :, mid] - y[:, :, mid]).norm() / x[:, :, mid].norm()))
        errors.append(err)
    assert errors == sorted(errors) and errors[0] < errors[-1]


def test_generate_with_kvtc_cache_matches_dynamic_cache(reference):
    model_dir, model, tok, stream = reference
    ids = stream[2000:2300][None]
    mask = torch.ones_like(ids)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    cache = KVTCCache(kvcal.load(model_dir, ratio=8, model=model), config=model.config)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, past_key_values=cache)
    assert cache.middle.tokens > 0
    assert tok.decode(out[0, ids.shape[1] :]).strip()
    assert torch.equal(ref, out)
