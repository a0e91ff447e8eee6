"""Eviction baselines at equal memory: at ratio ``r`` a layer keeps ``round(middle / r)`` middle tokens.

Bytes: an evicting method stores the kept tokens at bf16, nothing more: ``kept × bf16 bytes per token``.
The positions of kept tokens are not billed, because cached keys already carry RoPE at their true position
and new tokens are fed at true positions, so nothing needs them (the convention of the SnapKV and PyramidKV
papers, which compare at equal KV memory). Sink and window are kept by every method and not counted.

Scores follow SnapKV: the last ``obs_window`` queries of the prefill (which, in the needle probe, include the
question) attend over the cache; attention is summed over those queries and over the query heads that share
a KV head, then max-pooled along tokens (kernel 7) so neighbours of a hit survive together. Selection is per
KV head, as in SnapKV: each head keeps its own tokens, every head of a layer keeps the same number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvcal.errors import KvcalError, RatioError
from kvcal.eval.methods.base import (
    CacheMethod,
    MethodContext,
    MethodOutput,
    Prefilled,
    middle_bf16_bytes,
    splice_middle,
    with_layers,
)
from kvcal.fit.budgets import pyramid_budgets


def check_eviction_ratio(name: str, ratio: float | None) -> float:
    if ratio is None or not ratio >= 1.0:
        raise RatioError(f"{name} needs a target ratio >= 1 (kept middle tokens = middle / ratio); pass --ratio")
    return float(ratio)


def kept_count(middle: int, ratio: float) -> int:
    return min(middle, round(middle / ratio))


@torch.no_grad()
def snapkv_scores(pre: Prefilled, ctx: MethodContext, layer: int, pool_kernel: int = 7) -> torch.Tensor:
    """Importance ``[batch, kv_heads, middle]`` of each middle token of ``layer`` (higher = keep)."""
    lo, hi = ctx.middle(pre.length)
    n = pre.length
    queries = pre.queries[layer][:, :, -ctx.obs_window :]
    w = queries.shape[2]
    q = ctx.adapter.rotate_queries(queries, layer, pre.positions(n - w, n))
    lay = pre.cache.layers[layer]
    # The keys attention sees: the cache itself, except in layouts (MLA) that cache a latent to expand.
    keys = ctx.adapter.attention_keys(layer, lay.keys, lay.values).float()
    scores = torch.matmul(q, keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1).transpose(-1, -2))
    causal = torch.arange(n, device=q.device)[None, :] > torch.arange(n - w, n, device=q.device)[:, None]
    attn = (scores * ctx.adapter.attention_scale(layer)).masked_fill(causal, float("-inf")).softmax(-1).sum(2)
    b, cache_heads = lay.keys.shape[:2]  # attention summed over the query heads that read each cached head
    per_cache_head = attn.view(b, cache_heads, -1, n).sum(2)[..., lo:hi]
    m = hi - lo
    pooled = F.max_pool1d(per_cache_head.reshape(b * cache_heads, 1, m), pool_kernel, stride=1, padding=pool_kernel // 2)
    return pooled.reshape(b, cache_heads, m)


@torch.no_grad()
def accumulated_attention(pre: Prefilled, ctx: MethodContext, layer: int, chunk: int = 256) -> torch.Tensor:
    """H2O scores ``[batch, kv_heads, middle]``: the causal attention each middle key of ``layer`` receives,
    summed over every query of the prefill and over the query heads that read its KV head.

    Queries are processed ``chunk`` at a time, so memory stays ``O(chunk × length)`` per head.
    """
    lo, hi = ctx.middle(pre.length)
    n = pre.length
    queries = pre.queries[layer]
    if queries.shape[2] != n:
        raise KvcalError(f"H2O needs all {n} prefill queries of layer {layer} but the prefill kept {queries.shape[2]}; "
                         "prefill with prefill_with_queries(..., all_queries=True)")
    lay = pre.cache.layers[layer]
    keys = ctx.adapter.attention_keys(layer, lay.keys, lay.values).float()
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1).transpose(-1, -2)
    scale = ctx.adapter.attention_scale(layer)
    total = torch.zeros(queries.shape[0], queries.shape[1], n, device=keys.device)
    cols = torch.arange(n, device=keys.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        q = ctx.adapter.rotate_queries(queries[:, :, s:e], layer, pre.positions(s, e))
        causal = cols[None, :] > cols[s:e, None]
        total += (torch.matmul(q, keys) * scale).masked_fill(causal, float("-inf")).softmax(-1).sum(2)
    b, cache_heads = lay.keys.shape[:2]
    return total.view(b, cache_heads, -1, n).sum(2)[..., lo:hi]


def keep_middle(t: torch.Tensor, lo: int, hi: int, idx: torch.Tensor) -> torch.Tensor:
    """``t`` ``[b, h, n, d]`` keeping of its middle only the tokens ``idx`` ``[b, h, k]`` (middle-relative)."""
    kept = t[:, :, lo:hi].gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))
    return splice_middle(t, lo, hi, kept)


def evict_to(pre: Prefilled, ctx: MethodContext, keep: dict[int, torch.Tensor]) -> MethodOutput:
    """Apply per-layer kept indices (sorted, middle-relative) and bill the kept tokens at bf16."""
    lo, hi = ctx.middle(pre.length)
    L = ctx.layout
    per_head_token = (L.head_dim + L.v_head_dim) * 2
    replaced, stored = {}, 0
    for layer, idx in keep.items():
        lay = pre.cache.layers[layer]
        replaced[layer] = (keep_middle(lay.keys, lo, hi, idx), keep_middle(lay.values, lo, hi, idx))
        stored += idx.numel() * per_head_token
    return MethodOutput(with_layers(pre.cache, replaced), stored, middle_bf16_bytes(ctx, pre))


def recent_indices(pre: Prefilled, ctx: MethodContext, count: int) -> torch.Tensor:
    lo, hi = ctx.middle(pre.length)
    k0 = pre.cache.layers[ctx.coded_layers[0]].keys
    idx = torch.arange(hi - lo - count, hi - lo, device=k0.device)
    return idx.expand(k0.shape[0], k0.shape[1], -1)


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    return scores.topk(count, dim=-1).indices.sort(dim=-1).values


@dataclass(frozen=True)
class StreamingLLM(CacheMethod):
    """Attention sinks plus the most recent tokens: the budget extends the recent window into the middle."""

    name: ClassVar[str] = "streamingllm"
    summary: ClassVar[str] = "sink + most recent tokens; the budget extends the recent window"
    takes_ratio: ClassVar[bool] = True

    def check(self, ctx: MethodContext, ratio: float | None) -> None:
        check_eviction_ratio(self.name, ratio)

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        lo, hi = ctx.middle(pre.length)
        idx = recent_indices(pre, ctx, kept_count(hi - lo, check_eviction_ratio(self.name, ratio)))
        return evict_to(pre, ctx, {layer: idx for layer in ctx.coded_layers})


@dataclass(frozen=True)
class SnapKV(CacheMethod):
    """SnapKV (Li et al. 2024): every layer keeps the same number of middle tokens, chosen per KV head."""

    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = "SnapKV: top tokens by observation-window attention, per KV head, same budget per layer"
    takes_ratio: ClassVar[bool] = True
    pool_kernel: int = 7

    def check(self, ctx: MethodContext, ratio: float | None) -> None:
        check_eviction_ratio(self.name, ratio)

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        lo, hi = ctx.middle(pre.length)
        count = kept_count(hi - lo, check_eviction_ratio(self.name, ratio))
        keep = {layer: top_indices(snapkv_scores(pre, ctx, layer, self.pool_kernel), count) for layer in ctx.coded_layers}
        return evict_to(pre, ctx, keep)


def layer_budgets(ctx: MethodContext, middle: int, per_layer: int) -> dict[int, int]:
    """The artifact's PyramidKV split of ``per_layer × layers`` middle tokens over the full-attention layers."""
    weights = ctx.require_artifact("pyramidkv").budget_weights()[list(ctx.coded_layers)]
    total = per_layer * len(ctx.coded_layers)
    budgets = pyramid_budgets(total, weights, min_tokens=1 if per_layer >= 1 else 0, max_tokens=middle)
    return dict(zip(ctx.coded_layers, budgets))


@dataclass(frozen=True)
class PyramidKV(CacheMethod):
    """PyramidKV: SnapKV scores, with the artifact's per-layer budgets (same total as SnapKV at this ratio).

    Layers then hold different numbers of tokens; the harness runs such caches through an attention that
    builds each layer's causal mask from its own length.
    """

    name: ClassVar[str] = "pyramidkv"
    summary: ClassVar[str] = "SnapKV scores with the artifact's per-layer PyramidKV budgets"
    takes_ratio: ClassVar[bool] = True
    needs_artifact: ClassVar[bool] = True
    pool_kernel: int = 7

    def check(self, ctx: MethodContext, ratio: float | None) -> None:
        super().check(ctx, ratio)
        check_eviction_ratio(self.name, ratio)

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        lo, hi = ctx.middle(pre.length)
        budgets = layer_budgets(ctx, hi - lo, kept_count(hi - lo, check_eviction_ratio(self.name, ratio)))
        keep = {layer: top_indices(snapkv_scores(pre, ctx, layer, self.pool_kernel), budgets[layer])
                for layer in ctx.coded_layers}
        return evict_to(pre, ctx, keep)


@dataclass(frozen=True)
class H2O(CacheMethod):
    """H2O (Zhang et al. 2023), Heavy-Hitter Oracle: keep the middle tokens with the largest accumulated attention.

    This is the *prefill-accumulated* variant: each middle key's score is the causal attention it receives summed
    over every query of the prefill (and over the query heads sharing its KV head); scores are computed once,
    after prefill, and are not updated while the continuation is teacher-forced (H2O proper re-scores and evicts
    at every decoding step). Selection is per KV head and the budget is SnapKV's: every layer keeps
    ``round(middle / ratio)`` middle tokens, billed at bf16, so bytes equal ``streamingllm``'s and ``snapkv``'s at
    the same ratio. The sink and window stay exact, as in every method (H2O's own recent window is the window).
    """

    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = "H2O: top tokens by attention accumulated over the whole prefill, per KV head"
    takes_ratio: ClassVar[bool] = True
    needs_all_queries: ClassVar[bool] = True
    chunk: int = 256  # prefill queries scored at a time

    def check(self, ctx: MethodContext, ratio: float | None) -> None:
        check_eviction_ratio(self.name, ratio)

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        lo, hi = ctx.middle(pre.length)
        count = kept_count(hi - lo, check_eviction_ratio(self.name, ratio))
        keep = {layer: top_indices(accumulated_attention(pre, ctx, layer, self.chunk), count)
                for layer in ctx.coded_layers}
        return evict_to(pre, ctx, keep)
