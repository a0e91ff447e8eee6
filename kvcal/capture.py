"""Capture: run calibration text through the model and stream KV statistics out of it.

Memory stays bounded whatever the amount of data: per PCA group only running moments (sum and sum of
outer products) are kept, plus a fixed-size reservoir of held-out token vectors on which the bit
allocation later measures real quantization error, plus per-layer attention statistics.
Keys are taken *before* RoPE by un-rotating the cached keys at their true positions (the adapters
verify this reproduces the model's own pre-RoPE projection). Sink tokens are left out of the statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kvcal.adapters import ModelAdapter

KINDS = ("k", "v")


@dataclass(frozen=True)
class CaptureSpec:
    groups: tuple[tuple[int, ...], ...]  # layers whose heads are concatenated into one PCA vector
    sink: int = 4
    obs_window: int = 32  # last queries whose attention over the context feeds the budgets
    heldout_every: int = 8  # every k-th sequence is held out for measuring quantization error
    heldout_tokens: int = 4096  # reservoir size of held-out token vectors
    seed: int = 0
    query_moments: bool = True  # accumulate what the attention-aware metric needs (off for adapters without it)


class StreamingMoments:
    """Running sum and sum of outer products, in float64, of vectors of one PCA group."""

    def __init__(self, dim: int, device: torch.device):
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    # Rows per float64 pass when a batch is large (8B/12B shapes: 32k tokens x 40k dims would be a 10 GB copy).
    # Smaller batches go in one pass, as they always have (the same sums, to the bit).
    CHUNK_ELEMENTS = 1 << 27

    def add(self, x: torch.Tensor) -> None:
        # A batch within CHUNK_ELEMENTS has at most ``rows`` rows, so it is one pass over all of it.
        rows = max(1, self.CHUNK_ELEMENTS // max(x.shape[1], 1))
        for start in range(0, x.shape[0], rows):
            part = x[start : start + rows].to(torch.float64)
            self.count += part.shape[0]
            self.sum += part.sum(0)
            self.outer.addmm_(part.T, part)

    def head_covariances(self, d: int) -> torch.Tensor:
        """The ``[p / d, d, d]`` diagonal blocks of the covariance, without forming the ``[p, p]`` whole: the same
        values as ``mean_and_covariance``'s, element for element (at 12B shapes the whole is a 13 GB float64 copy)."""
        blocks = self.sum.shape[0] // d
        mean = (self.sum / self.count).reshape(blocks, d)
        idx = torch.arange(blocks, device=self.outer.device)
        cov = self.outer.reshape(blocks, d, blocks, d)[idx, :, idx, :] / self.count - mean[:, :, None] * mean[:, None, :]
        return (cov + cov.transpose(1, 2)) / 2

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        # In place where that changes no value: at 12B shapes each [p, p] temporary is 13 GB of GPU memory.
        mean = self.sum / self.count
        cov = self.outer / self.count
        cov -= torch.outer(mean, mean)
        sym = cov + cov.T
        del cov
        return mean, sym.div_(2)


class TokenReservoir:
    """Uniform sample of at most ``capacity`` rows from a stream (Algorithm R, seeded: deterministic)."""

    def __init__(self, capacity: int, dim: int, seed: int):
        self.capacity, self.seen = capacity, 0
        self.rows = torch.empty(0, dim)
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().cpu()
        room = self.capacity - self.rows.shape[0]
        if room > 0:
            self.rows = torch.cat([self.rows, x[:room]])
            x, self.seen = x[room:], self.seen + min(room, x.shape[0])
        for row in x:  # only reached once the reservoir is full: a few draws per token
            self.seen += 1
            j = int(torch.randint(self.seen, (1,), generator=self.gen))
            if j < self.capacity:
                self.rows[j] = row


@dataclass
class AttentionStats:
    """Per layer: how spread the attention of the last queries is over the context."""

    entropy_sum: torch.Tensor  # [layers] sum over (sequence, head, query) of attention entropy (nats)
    count: torch.Tensor  # [layers]

    def mean_entropy(self) -> torch.Tensor:
        return self.entropy_sum / self.count.clamp_min(1)


class QueryMoments:
    """Per layer and KV head, the second moment ``E[q' q'^T]`` of the queries that read that head's keys.

    ``q'`` is a pre-RoPE query rotated by a relative offset drawn uniformly from ``[1, seq_len]``: with RoPE the
    score of a query at ``p_q`` on a pre-RoPE key at ``p_k`` is ``(R(p_q - p_k) q) . k``, so a key error ``e``
    changes it by ``q'. e`` and ``E[(q'. e)^2] = e^T M e``. All query heads of a GQA group are pooled, since they
    all read the one KV head. Float64 sums, like the key/value moments.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, device: torch.device):
        self.sum = torch.zeros(num_layers, kv_heads, head_dim, head_dim, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_layers, dtype=torch.float64)

    def add(self, layer: int, rotated: torch.Tensor) -> None:
        """``rotated`` ``[b, q_heads, n, d]``: queries already rotated by their relative offsets."""
        b, hq, n, d = rotated.shape
        kv = self.sum.shape[1]
        x = rotated.to(torch.float64).reshape(b, kv, hq // kv, n, d).permute(1, 0, 2, 3, 4).reshape(kv, -1, d)
        self.sum[layer] += x.transpose(1, 2) @ x
        self.count[layer] += b * n * (hq // kv)

    def second_moment(self, layer: int) -> torch.Tensor:
        """``[kv_heads, d, d]`` mean of ``q' q'^T`` per query (not per GQA group)."""
        return self.sum[layer] / max(float(self.count[layer]), 1.0)


@dataclass
class CaptureResult:
    spec: CaptureSpec
    moments: dict[tuple[str, int], StreamingMoments]  # (kind, group index) -> moments
    heldout: dict[tuple[str, int], TokenReservoir]
    attention: AttentionStats
    tokens: int  # tokens that went into the moments
    sequences: int
    dims: dict[tuple[str, int], int] = field(default_factory=dict)
    queries: QueryMoments | None = None


def group_vectors(per_layer: dict[int, torch.Tensor], layers: tuple[int, ...]) -> torch.Tensor:
    """``{layer: [b, h, n, d]}`` -> ``[b*n, sum(h*d)]``: one row per token, layers then heads then dims."""
    parts = []
    for layer in layers:
        x = per_layer[layer]
        b, h, n, d = x.shape
        parts.append(x.permute(0, 2, 1, 3).reshape(b * n, h * d))
    return torch.cat(parts, dim=1)


@contextlib.contextmanager
def last_queries(adapter: ModelAdapter, layers: range, window: int | None) -> Iterator[dict[int, torch.Tensor]]:
    """Hooks that keep the pre-RoPE queries of the last ``window`` tokens (all with ``None``) of every layer;
    removed on exit."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(_module, _args, output, layer=layer):
            q = adapter.split_query(output)
            store[layer] = (q if window is None else q[:, :, -window:]).detach()

        handles.append(adapter.query_source(layer).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def attention_entropy(
    adapter: ModelAdapter, layer: int, queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Entropy ``[b, heads, w]`` of each of the last ``w`` queries' causal attention over the whole context."""
    w, n = queries.shape[-2], keys.shape[-2]
    q = adapter.rotate_queries(queries, layer, positions[:, n - w :])
    k = keys.float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * adapter.attention_scale(layer)
    causal = torch.arange(n, device=q.device)[None, :] > torch.arange(n - w, n, device=q.device)[:, None]
    scores = scores.masked_fill(causal, float("-inf"))
    p = scores.softmax(-1)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


@torch.no_grad()
def capture_kv_statistics(
    model, adapter: ModelAdapter, windows: torch.Tensor, spec: CaptureSpec, batch_size: int = 1, progress: bool = True
) -> CaptureResult:
    """Stream ``windows`` ``[n_seq, seq_len]`` through ``model`` and accumulate what fitting needs."""
    layout = adapter.layout()
    device = next(model.parameters()).device
    dims = {}
    for g, layers in enumerate(spec.groups):
        dims[("k", g)] = len(layers) * layout.num_kv_heads * layout.head_dim
        dims[("v", g)] = len(layers) * layout.num_kv_heads * layout.v_head_dim
    moments = {key: StreamingMoments(dim, device) for key, dim in dims.items()}
    heldout = {key: TokenReservoir(spec.heldout_tokens, dim, spec.seed + i) for i, (key, dim) in enumerate(dims.items())}
    attention = AttentionStats(torch.zeros(layout.num_layers, dtype=torch.float64), torch.zeros(layout.num_layers))
    query_moments = (QueryMoments(layout.num_layers, layout.num_kv_heads, layout.head_dim, device)
                     if spec.query_moments else None)
    offsets_gen = torch.Generator().manual_seed(spec.seed + 7919)
    tokens = 0
    n_seq, seq_len = windows.shape
    coded = sorted({layer for group in spec.groups for layer in group})
    obs = min(spec.obs_window, seq_len - spec.sink)
    for start in tqdm(range(0, n_seq, batch_size), desc="capture", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        with last_queries(adapter, range(layout.num_layers), None) as queries:
            cache = model(input_ids=ids, use_cache=True).past_key_values
        b = ids.shape[0]
        positions = torch.arange(seq_len, device=device)[None].expand(b, -1)
        held = (start // batch_size) % spec.heldout_every == spec.heldout_every - 1
        pre_k, vals = {}, {}
        for layer in range(layout.num_layers):
            keys, values = cache.layers[layer].keys, cache.layers[layer].values
            if keys.shape[-2] == seq_len:  # sliding layers may hold fewer tokens: no attention stats for them
                attn_keys = adapter.attention_keys(layer, keys, values)
                ent = attention_entropy(adapter, layer, queries[layer][:, :, -obs:], attn_keys, positions)
                attention.entropy_sum[layer] += ent.double().sum().cpu()
                attention.count[layer] += ent.numel()
            if layer in coded:
                pre_k[layer] = adapter.unrotate_keys(keys, layer, positions)[:, :, spec.sink :]
                vals[layer] = values.float()[:, :, spec.sink :]
                if query_moments is not None and not held:
                    offsets = torch.randint(1, seq_len + 1, (b, seq_len), generator=offsets_gen).to(device)
                    query_moments.add(layer, adapter.rotate_queries(queries[layer], layer, offsets))
        for g, layers in enumerate(spec.groups):
            for kind, per_layer in (("k", pre_k), ("v", vals)):
                x = group_vectors(per_layer, layers)
                if held:
                    heldout[(kind, g)].add(x)
                else:
                    moments[(kind, g)].add(x)
        if not held:
            tokens += b * (seq_len - spec.sink)
        del cache
    return CaptureResult(spec, moments, heldout, attention, tokens, n_seq, dims, query_moments)
