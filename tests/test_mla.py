"""DeepSeek-V3 (MLA): the adapter matches what transformers caches, and calibrate/codec/KVTCCache work on it.

transformers caches MLA's latent: ``keys`` is ``c_kv`` (no RoPE) and ``values`` is the shared, already rotated
``k_rot``. Un-rotating the cached keys is therefore the identity, which the shared adapter test forbids (it checks
RoPE changed the keys), so these models are not in ``FAMILIES``; the other shared checks run on them here as they are.
"""

import pytest
import torch
from fixtures import MLA_FAMILIES
from test_adapters import test_config_only_adapter_matches_model_rope as check_config_only_rope
from test_cache import test_generate_matches_dynamic_cache_at_mild_ratio as check_generate
from test_calibrate import test_calibrate_every_family_writes_a_valid_artifact as check_artifact
from test_codec import prefill
from test_codec import test_round_trip_exact_ends_and_ratio as check_round_trip

import kvcal
from kvcal.adapters import adapter_for
from kvcal.capture import attention_entropy, last_queries
from kvcal.models import load_model


def forward_catching(model, modules, ids, **kwargs):
    """Run ``model`` once; return its output and each module's output, by position in ``modules``."""
    caught = {}
    hooks = [m.register_forward_hook(lambda _m, _a, o, i=i: caught.__setitem__(i, o)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out, caught


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_cache_holds_the_latent_and_the_rotated_rope_key(tiny_models, family):
    model, _ = load_model(tiny_models[family], "cpu")
    adapter = adapter_for(model)
    layout = adapter.layout()
    n_layers, rank = layout.num_layers, model.config.kv_lora_rank
    latents = [adapter.key_source(i) for i in range(n_layers)]
    kv_a = [adapter.attention(i).kv_a_proj_with_mqa for i in range(n_layers)]
    ids = torch.randint(2, 128, (2, 300), generator=torch.Generator().manual_seed(0))
    out, caught = forward_catching(model, latents + kv_a, ids)
    pos = torch.arange(300)[None].expand(2, -1)
    for layer in range(n_layers):
        keys, values = out.past_key_values.layers[layer].keys, out.past_key_values.layers[layer].values
        assert keys.shape == (2, 1, 300, layout.head_dim) and values.shape == (2, 1, 300, layout.v_head_dim)
        # Keys: the position-free latent; the codec's un-rotation must leave it exactly as the model made it.
        pre = adapter.unrotate_keys(keys, layer, pos)
        assert torch.equal(pre, adapter.split_key(caught[layer]).float())
        assert torch.equal(adapter.rotate_keys(pre, layer, pos), keys.float())
        # Values: k_rot after RoPE; undoing it (de-interleaving as the model does) gives kv_a_proj's k_pe.
        k_pe = caught[n_layers + layer][..., rank:].unsqueeze(1)
        k_rot = adapter.unrotate_rope_keys(values, layer, pos)
        assert torch.allclose(k_rot, k_pe, atol=1e-5 * float(k_pe.abs().max())), (family, layer)
        assert not torch.allclose(k_rot[:, :, 50:], values[:, :, 50:], atol=1e-3)


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_attention_statistics_match_the_models_attention(tiny_models, family):
    # Capture's entropies rebuild attention from pre-RoPE queries and the cache: rotated query tail, expanded keys.
    model, _ = load_model(tiny_models[family], "cpu")
    model.set_attn_implementation("eager")
    adapter = adapter_for(model)
    n_layers, w = adapter.layout().num_layers, 16
    ids = torch.randint(2, 128, (2, 120), generator=torch.Generator().manual_seed(1))
    with last_queries(adapter, range(n_layers), w) as queries, torch.no_grad():
        out = model(input_ids=ids, use_cache=True, output_attentions=True)
    pos = torch.arange(120)[None].expand(2, -1)
    for layer in range(n_layers):
        lay = out.past_key_values.layers[layer]
        ent = attention_entropy(adapter, layer, queries[layer], adapter.attention_keys(layer, lay.keys, lay.values), pos)
        p = out.attentions[layer][:, :, -w:].float()
        ref = -(p * p.clamp_min(1e-30).log()).sum(-1)
        assert torch.allclose(ent, ref, atol=1e-4), (family, layer, float((ent - ref).abs().max()))


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_config_only_adapter_matches_model_rope(tiny_models, family):
    check_config_only_rope(tiny_models, family)


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_calibrate_writes_a_valid_artifact(calibrated, family):
    check_artifact(calibrated, family)
    art = kvcal.Artifact.load(calibrated(family))
    assert bool((art.tensors["attention.entropy"] > 0).all())  # attention statistics were gathered on every layer


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_round_trip_exact_ends_ratio_and_determinism(calibrated, family):
    check_round_trip(calibrated, family)
    model_dir = calibrated(family)
    model, cache = prefill(model_dir)
    with_model, without = kvcal.load(model_dir, ratio=4, model=model), kvcal.load(model_dir, ratio=4)
    blob = with_model.compress(cache)
    assert blob == with_model.compress(cache) == without.compress(cache)
    for a, b in zip(with_model.decompress(blob).layers, without.decompress(blob).layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_generate_matches_dynamic_cache_at_mild_ratio(calibrated, family):
    check_generate(calibrated, family)
