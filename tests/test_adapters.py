"""Un-rotating cached keys must reproduce each family's own pre-RoPE key projection."""

import pytest
import torch
from fixtures import FAMILIES

from kvcal.adapters import adapter_for, adapter_for_config
from kvcal.errors import ModelError
from kvcal.models import check_model_dir, load_model


@pytest.mark.parametrize("family", FAMILIES)
def test_unrotate_reproduces_pre_rope_keys(tiny_models, family):
    model, _ = load_model(tiny_models[family], "cpu")
    adapter = adapter_for(model)
    layout = adapter.layout()
    caught = {}
    hooks = [adapter.key_source(i).register_forward_hook(lambda m, a, o, i=i: caught.__setitem__(i, o))
             for i in range(layout.num_layers)]
    ids = torch.randint(2, 128, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    for h in hooks:
        h.remove()
    for layer in range(layout.num_layers):
        keys = cache.layers[layer].keys
        pos = torch.arange(keys.shape[-2])[None].expand(2, -1)
        pre = adapter.unrotate_keys(keys, layer, pos)
        ref = adapter.split_key(caught[layer])
        assert torch.allclose(pre, ref.float(), atol=1e-5 * float(ref.abs().max()) + 1e-6), (family, layer)
        assert torch.allclose(adapter.rotate_keys(pre, layer, pos), keys.float(), atol=1e-5 * float(keys.abs().max()))
        # Not trivially the identity: RoPE does change the keys away from position 0.
        assert not torch.allclose(pre[:, :, 50:], keys[:, :, 50:].float(), atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_only_adapter_matches_model_rope(tiny_models, family):
    model, _ = load_model(tiny_models[family], "cpu")
    a, b = adapter_for(model), adapter_for_config(model.config)
    pos = torch.arange(64)[None]
    assert a.layout() == b.layout()
    for layer in range(a.layout().num_layers):
        assert all(torch.equal(x, y) for x, y in zip(a.cos_sin(layer, pos), b.cos_sin(layer, pos)))


def test_partial_rotary_and_sliding_layouts(tiny_models):
    phi = adapter_for(load_model(tiny_models["phi3"], "cpu")[0]).layout()
    assert phi.rotary_dim == phi.head_dim // 2
    gemma = adapter_for(load_model(tiny_models["gemma3"], "cpu")[0]).layout()
    assert gemma.exact_layers and set(gemma.coded_layers).isdisjoint(gemma.exact_layers)


def test_bad_model_dirs_give_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        check_model_dir(tmp_path / "missing")
    with pytest.raises(ModelError, match="no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertForMaskedLM"]}')
    with pytest.raises(ModelError, match="not a causal LM"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        check_model_dir(tmp_path)
