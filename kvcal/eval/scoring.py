"""Teacher-forced scoring with a (possibly compressed or evicted) cache.

A cache method may shrink the cache (eviction) but tokens fed afterwards keep their true positions:
RoPE is applied at ``position_ids`` while the causal mask follows the cache's own length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

CacheTransform = Callable[[DynamicCache], DynamicCache]


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor) -> DynamicCache:
    """Run ``input_ids`` ``[batch, n]`` and return the cache it leaves."""
    out = model(input_ids=input_ids.to(model.device), use_cache=True)
    return out.past_key_values


@torch.no_grad()
def continue_from(model, cache: DynamicCache, input_ids: torch.Tensor, start_position: int) -> torch.Tensor:
    """Logits ``[batch, n, vocab]`` for ``input_ids`` fed after ``cache`` at positions ``start_position``…"""
    n = input_ids.shape[1]
    pos = torch.arange(start_position, start_position + n, device=model.device).unsqueeze(0)
    pos = pos.expand(input_ids.shape[0], -1)
    out = model(input_ids=input_ids.to(model.device), past_key_values=cache, position_ids=pos, use_cache=True)
    return out.logits.float()


def evict_middle(cache: DynamicCache, sink: int, window: int) -> DynamicCache:
    """Keep only the first ``sink`` and the last ``window`` tokens of every layer (StreamingLLM)."""
    kept = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        n = k.shape[-2]
        if n > sink + window:
            idx = torch.cat([torch.arange(sink), torch.arange(n - window, n)]).to(k.device)
            k, v = k.index_select(-2, idx), v.index_select(-2, idx)
        kept.append((k, v))
    return DynamicCache(kept)
