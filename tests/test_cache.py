"""KVTCCache inside generate(): correct lengths, exact ends, real memory savings, same greedy text at mild ratios."""

import pytest
import torch
from test_codec import text_ids

import kvcal
from kvcal.cache import KVTCCache, dynamic_cache_bytes
from kvcal.models import load_model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi3"])
def test_generate_matches_dynamic_cache_at_mild_ratio(calibrated, family):
    model_dir = calibrated(family)
    model, tokenizer = load_model(model_dir, "cpu")
    codec = kvcal.load(model_dir, ratio=2, model=model)
    ids = text_ids(tokenizer, 160, 1, seed=1)  # text like the calibration's, as a served prompt would be
    mask = torch.ones_like(ids)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, min_new_tokens=24)
    cache = KVTCCache(codec, block=16, config=model.config)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, min_new_tokens=24, past_key_values=cache)
    assert torch.equal(ref, out)
    assert cache.get_seq_length() == ids.shape[1] + 23
    assert cache.middle.tokens > 0


def test_cache_attends_to_the_right_tensors_and_saves_memory(calibrated):
    model_dir = calibrated("llama")
    model, _ = load_model(model_dir, "cpu")
    codec = kvcal.load(model_dir, ratio=8, model=model)
    ids = torch.randint(2, 128, (2, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dyn = model(input_ids=ids, use_cache=True).past_key_values
        cache = KVTCCache(codec, block=32)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    keys, values = layer.full_states()
    ref = dyn.layers[0]
    assert keys.shape == ref.keys.shape and values.shape == ref.values.shape
    assert torch.equal(keys[:, :, :4], ref.keys[:, :, :4])
    assert torch.equal(values[:, :, -codec.window :], ref.values[:, :, -codec.window :])
    err_k = float((keys - ref.keys).norm() / ref.keys.norm())
    err_v = float((values - ref.values).norm() / ref.values.norm())
    # The attention-aware metric spends little on keys the queries barely read, so keys may lose more than values.
    assert 0 < err_k < 1.0 and 0 < err_v < 0.6, (err_k, err_v)
    assert cache.resident_bytes() < 0.6 * dynamic_cache_bytes(dyn)
