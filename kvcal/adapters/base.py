"""What every model family shares: where the KV layout comes from and how RoPE is undone and redone.

An adapter never re-implements a family's rotary embedding. It asks the model's own rotary module for
``cos``/``sin`` at the tokens' true positions, so every RoPE variant transformers implements (default,
Llama-3 scaling, YaRN and LongRoPE with their attention factor, dynamic) is undone exactly: the cached key
is ``k' = k*cos + rotate_half(k)*sin`` on the first ``rotary_dim`` dims, and since ``cos`` and ``sin`` may
both carry an attention factor ``a``, the inverse is ``(k'*cos - rotate_half(k')*sin) / (cos^2 + sin^2)``.
Models whose pre-RoPE rotary dims come in adjacent pairs (DeepSeek's ``rope_interleave``) rotate them into
``rotate_half``'s halves layout; ``interleaved`` makes the adapter de-interleave before and re-interleave after.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

# RoPE types whose cos/sin at a position do not depend on the other positions of the call.
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_MAX_TABLE_POSITIONS = 1 << 20


@dataclass(frozen=True)
class KVLayout:
    """Shapes of one model's KV cache, per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int  # key head size
    v_head_dim: int  # value head size (differs from keys in MLA models)
    rotary_dim: int  # leading key dims that RoPE rotates (partial rotary rotates fewer than head_dim)
    exact_layers: tuple[int, ...] = ()  # sliding-window layers: already bounded, stored exactly

    @property
    def coded_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.exact_layers)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, half-split form, on the first ``rot = cos.shape[-1]`` dims of float32 ``x``, written into ``out`` (the
    rest copied); ``cos``/``sin`` broadcast against ``x``. Every element is the float32 expression
    ``h * cos + rotate_half(h) * sin`` of the textbook form, without its concatenations, so any layout of ``x``
    (one layer's ``[b, h, n, d]``, or a whole group's decoded rows ``[n, layers * h, d]``) gives the same bits."""
    rot = cos.shape[-1]
    half = rot // 2
    if rot < x.shape[-1]:
        out[..., rot:] = x[..., rot:]
    x1, x2 = x[..., :half], x[..., half:rot]
    o1, o2 = out[..., :half], out[..., half:rot]
    torch.mul(x1, cos[..., :half], out=o1).sub_(x2 * sin[..., :half])
    torch.mul(x2, cos[..., half:], out=o2).add_(x1 * sin[..., half:])
    return out


def unrotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rotate_into`` on the first ``rot`` dims only (``out`` and ``x`` hold exactly those):
    ``(h * cos - rotate_half(h) * sin) / (cos^2 + sin^2)``, the same float32 expression for any layout."""
    half = cos.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos[..., :half], out=o1).add_(x2 * sin[..., :half])  # first half
    torch.mul(x2, cos[..., half:], out=o2).sub_(x1 * sin[..., half:])  # second half
    return out.div_(norm)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Pairs ``(x0, x1), (x2, x3), ...`` -> halves ``(x0, x2, ..., x1, x3, ...)``."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def interleave(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``deinterleave``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.stack((x1, x2), dim=-1).flatten(-2)


class ModelAdapter:
    """Base adapter: Llama-style attention with separate q/k/v projections and no q/k norm."""

    model_types: ClassVar[tuple[str, ...]] = ()
    interleaved: bool = False  # pre-RoPE rotary dims are adjacent pairs that the model rotates into halves
    # Whether the cache's keys/values are what queries and o_proj read directly, so that the attention-aware
    # metric (``kvcal.fit.metric``) applies; MLA caches a latent instead and falls back to plain squared error.
    supports_attention_metric: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config.get_text_config(decoder=True)
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.rotary = self.decoder.rotary_emb
        self._rotary_takes_layer_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        # Dynamic and LongRoPE rescale with the sequence length seen, so their tables cannot be reused.
        # Multi-type rotaries (Gemma 3) hold one rope type per layer type.
        rope_type = getattr(self.rotary, "rope_type", None)
        types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
        self._rope_cacheable = all(isinstance(t, str) and t in _STATIC_ROPE_TYPES for t in types)
        self._rope_tables: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_memo: tuple | None = None

    # --- layout -----------------------------------------------------------------------------------------
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def layout(self) -> KVLayout:
        c = self.config
        n = c.num_hidden_layers
        head_dim = self.head_dim()
        cos, _ = self.cos_sin(0, torch.zeros(1, 1, dtype=torch.long))
        return KVLayout(
            num_layers=n,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            v_head_dim=head_dim,
            rotary_dim=cos.shape[-1],
            exact_layers=self.sliding_layers(),
        )

    def sliding_layers(self) -> tuple[int, ...]:
        types = getattr(self.config, "layer_types", None) or []
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")

    def attention(self, layer_idx: int) -> nn.Module:
        return self.decoder.layers[layer_idx].self_attn

    # --- RoPE -------------------------------------------------------------------------------------------
    def layer_type(self, layer_idx: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[layer_idx] if types else "full_attention"

    @torch.no_grad()
    def cos_sin(self, layer_idx: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` ``[batch, n, rotary_dim]`` in float32, exactly as the model's rotary module makes them.

        For RoPE types whose tables do not depend on the sequence length, a table over positions ``0..N`` is built
        once (per layer type and device) and gathered from: each entry is the same float32 ``cos(pos * freq)`` the
        module computes, so the result is bit-identical, without a rotary call per codec or capture step.
        Those tables are always computed on the host (a CPU copy of the rotary module when the model is elsewhere)
        and then copied to the positions' device, so CUDA and CPU code with the very same factors (the same blobs),
        and a codec built from a config alone does not go back to the host on every call.
        """
        device = next(self.rotary.buffers()).device
        if not self._rope_cacheable or positions.numel() == 0:
            return self._rotary_cos_sin(layer_idx, positions.to(device))
        need = int(positions.max()) + 1
        if int(positions.min()) < 0 or need > _MAX_TABLE_POSITIONS:
            return self._rotary_cos_sin(layer_idx, positions.to(device))
        table = self._rope_table(layer_idx, need, positions.device)
        return table[0][positions], table[1][positions]

    def cos_sin_span(self, layer_idx: int, start: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos_sin`` of positions ``start .. start + n - 1`` as ``[n, rotary_dim]`` each: views of the cached table
        where there is one (no gather), else computed. Same values either way."""
        end = start + n
        if self._rope_cacheable and n > 0 and 0 <= start and end <= _MAX_TABLE_POSITIONS:
            cos, sin = self._rope_table(layer_idx, end, torch.device(device))
            return cos[start:end], sin[start:end]
        cos, sin = self.cos_sin(layer_idx, torch.arange(start, end, device=device)[None])
        return cos[0], sin[0]

    def _rope_table(self, layer_idx: int, need: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ``cos``, ``sin`` ``[size, rot]`` of positions ``0 .. size - 1`` on ``device``, ``size >= need``."""
        key = (self.layer_type(layer_idx) if self._rotary_takes_layer_type else "", str(device))
        table = self._rope_tables.get(key)
        if table is None or table[0].shape[0] < need:
            size = min(_MAX_TABLE_POSITIONS, max(need, 2 * (table[0].shape[0] if table is not None else 2048)))
            cos, sin = self._host_cos_sin(layer_idx, torch.arange(size)[None])
            table = self._rope_tables[key] = (cos[0].to(device), sin[0].to(device))
        return table

    def _host_cos_sin(self, layer_idx: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if next(self.rotary.buffers()).device.type == "cpu":
            return self._rotary_cos_sin(layer_idx, positions)
        if getattr(self, "_host_rotary", None) is None:
            import copy

            self._host_rotary = copy.deepcopy(self.rotary).to("cpu")
        return self._rotary_cos_sin(layer_idx, positions, self._host_rotary)

    def _rotary_cos_sin(self, layer_idx: int, positions: torch.Tensor, rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = self.rotary if rotary is None else rotary
        probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
        if self._rotary_takes_layer_type:
            cos, sin = rotary(probe, positions, self.layer_type(layer_idx))
        else:
            cos, sin = rotary(probe, positions)
        return cos.float(), sin.float()

    def _rope_factors(self, layer_idx: int, positions: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
        """``cos``, ``sin`` ``[b, 1, n, rot]`` on ``device`` and the inverse's ``cos^2 + sin^2``. The codec passes one
        positions tensor for every layer of a group, so the last result is kept and reused while the same tensor
        (by identity: it is held here, so its id cannot be recycled) and the same layer type come back."""
        key = (self.layer_type(layer_idx) if self._rotary_takes_layer_type else "", str(device))
        memo = self._rope_memo
        if memo is not None and memo[0] is positions and memo[1] == key:
            return memo[2]
        cos, sin = self.cos_sin(layer_idx, positions)
        cos, sin = cos.to(device).unsqueeze(1), sin.to(device).unsqueeze(1)
        factors = (cos, sin, cos * cos + sin * sin)
        self._rope_memo = (positions, key, factors)
        return factors

    def _apply(self, keys: torch.Tensor, layer_idx: int, positions: torch.Tensor, inverse: bool) -> torch.Tensor:
        # Written half by half into one output, without rotate_half's concatenations; every element is the same
        # float32 expression as ``head * cos -/+ rotate_half(head) * sin`` (negations are exact), so the codes and
        # blobs are bit-identical to the textbook form.
        cos, sin, norm = self._rope_factors(layer_idx, positions, keys.device)
        rot = cos.shape[-1]
        x = keys.float()
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if not inverse:
            # Interleaved pairs are regrouped into halves first; the rotation itself is ``rotate_into``'s.
            return rotate_into(out, torch.cat((deinterleave(x[..., :rot]), x[..., rot:]), -1) if self.interleaved else x,
                               cos, sin)
        if rot < x.shape[-1]:
            out[..., rot:] = x[..., rot:]
        head = x[..., :rot]
        target = out[..., :rot] if not self.interleaved else torch.empty_like(head)
        unrotate_into(target, head, cos, sin, norm)
        if self.interleaved:
            out[..., :rot] = interleave(target)
        return out

    def unrotate_keys(self, keys: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        """Cached (rotated) keys ``[b, h, n, d]`` at ``positions`` ``[b, n]`` -> pre-RoPE keys, float32."""
        return self._apply(keys, layer_idx, positions, inverse=True)

    def rotate_keys(self, keys: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys -> keys as the model caches them, float32."""
        return self._apply(keys, layer_idx, positions, inverse=False)

    def unrotate_values(self, values: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        """Cached values -> position-free values; values carry no RoPE except in MLA's cache layout."""
        return values.float()

    def rotate_values(self, values: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        return values.float()

    def position_free(self, kind: str, x: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        """Keys (``kind="k"``) or values (``"v"``) as cached -> the position-free vectors PCA is fitted on."""
        fn = self.unrotate_keys if kind == "k" else self.unrotate_values
        return fn(x, layer_idx, positions)

    def at_positions(self, kind: str, x: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        """Inverse of ``position_free``: re-apply RoPE where the cache holds rotated vectors."""
        fn = self.rotate_keys if kind == "k" else self.rotate_values
        return fn(x, layer_idx, positions)

    # --- attention as the model computes it (capture's attention statistics) ----------------------------
    def rotate_queries(self, queries: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries (``split_query`` output) -> queries as attention sees them, float32."""
        return self.rotate_keys(queries, layer_idx, positions)

    def attention_keys(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One layer's cached ``(keys, values)`` -> the rotated keys ``[b, kv_heads, n, head_dim]`` attention uses."""
        return keys

    # --- pre-RoPE projections (for capture of queries and for verifying the inversion) -------------------
    def query_source(self, layer_idx: int) -> nn.Module:
        """The module whose output is the pre-RoPE query, ``[..., heads*head_dim]`` or per-head normed."""
        return self.attention(layer_idx).q_proj

    def key_source(self, layer_idx: int) -> nn.Module:
        return self.attention(layer_idx).k_proj

    def split_query(self, output: torch.Tensor) -> torch.Tensor:
        """Output of ``query_source`` -> ``[b, heads, n, head_dim]``."""
        b, n = output.shape[:2]
        return output.reshape(b, n, -1, self.head_dim()).transpose(1, 2)

    def split_key(self, output: torch.Tensor) -> torch.Tensor:
        b, n = output.shape[:2]
        return output.reshape(b, n, -1, self.head_dim()).transpose(1, 2)

    def output_projection(self, layer_idx: int) -> torch.Tensor:
        """``o_proj``'s weight ``[hidden, q_heads * v_head_dim]``: how value errors reach the residual stream."""
        return self.attention(layer_idx).o_proj.weight

    def attention_scale(self, layer_idx: int) -> float:
        return float(getattr(self.attention(layer_idx), "scaling", self.head_dim() ** -0.5))
