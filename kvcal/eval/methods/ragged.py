"""Attention for caches whose layers hold different numbers of tokens (PyramidKV budgets).

transformers builds one causal mask per forward from the length of the first full-attention layer, so a
layer holding fewer or more tokens would get a mask of the wrong width. Under ``ragged_attention(model)``
the model attends through a function that builds each layer's mask from its own key length instead: the
``q`` new tokens are the last ``q`` keys, so query ``i`` sees every key up to ``kv - q + i`` (and, in a
sliding-window layer, only the last ``sliding_window`` of those).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

IMPLEMENTATION = "kvcal_ragged"


def ragged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention ``[b, heads, q, d]`` -> ``[b, q, heads, d]`` with a per-layer bottom-right causal mask."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q_len, kv_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    k_pos = torch.arange(kv_len, device=query.device)[None, :]
    visible = k_pos <= q_pos
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.float().softmax(-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, ragged_attention_forward)


@contextlib.contextmanager
def ragged_attention(model) -> Iterator[None]:
    """Run ``model`` with per-layer causal masks; its own attention implementation is restored on exit."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def is_ragged(cache, layers: tuple[int, ...]) -> bool:
    return len({cache.layers[i].keys.shape[-2] for i in layers}) > 1
