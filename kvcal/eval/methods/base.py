"""What every evaluated cache method shares: the prefilled cache it starts from, and how it reports bytes.

A method turns a prefilled cache into the cache the model continues from (restored, quantized or evicted)
plus the bytes it would store for the *middle* tokens: everything but the first ``sink`` and the last
``window`` tokens of every full-attention layer. Sink, window and sliding-window layers stay exact under
every method and cost the same for all of them, so ratios compare the middle only
(``bf16 bytes of the middle / bytes stored for it``), like the codec's ``stats()['middle_ratio']``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import DynamicCache

from kvcal.adapters import KVLayout, ModelAdapter
from kvcal.artifact import Artifact
from kvcal.errors import ArtifactError

BF16_BYTES = 2
FP16_BYTES = 2


@dataclass
class Prefilled:
    """A cache straight after prefill, and the pre-RoPE queries of its last tokens (for eviction scores).

    ``queries`` holds the last ``obs_window`` queries of every layer, or all ``length`` of them when some method
    asks for them (``CacheMethod.needs_all_queries``); methods that want the last ``obs_window`` slice them.
    """

    cache: DynamicCache
    queries: dict[int, torch.Tensor]  # layer -> [batch, heads, obs (or length), head_dim], pre-RoPE
    length: int  # tokens in every full-attention layer; positions are 0..length-1

    def positions(self, lo: int, hi: int) -> torch.Tensor:
        device = self.cache.layers[0].keys.device
        batch = self.cache.layers[0].keys.shape[0]
        return torch.arange(lo, hi, device=device)[None].expand(batch, -1)


@dataclass
class MethodContext:
    """The model-side facts a method needs; built once per evaluation."""

    model: torch.nn.Module
    adapter: ModelAdapter
    layout: KVLayout
    sink: int
    window: int
    artifact: Artifact | None = None
    obs_window: int = 32
    _codecs: dict = field(default_factory=dict, repr=False)

    def middle(self, length: int) -> tuple[int, int]:
        """Cache indices ``[lo, hi)`` of the middle tokens of a cache holding ``length`` tokens."""
        lo = min(self.sink, length)
        return lo, max(lo, length - self.window)

    @property
    def coded_layers(self) -> tuple[int, ...]:
        return self.layout.coded_layers

    def bf16_bytes_per_token(self) -> int:
        """bf16 bytes one token occupies across all full-attention layers (keys and values)."""
        L = self.layout
        return L.num_kv_heads * (L.head_dim + L.v_head_dim) * BF16_BYTES * len(L.coded_layers)

    def require_artifact(self, method: str) -> Artifact:
        if self.artifact is None:
            raise ArtifactError(f"method {method!r} needs a calibration artifact; run `kvcal calibrate` or pass --artifact")
        return self.artifact

    def codec(self, ratio: float):
        """One ``KVTCCodec`` per ratio, built on first use (building one hashes the whole artifact)."""
        from kvcal.codec.kvtc import KVTCCodec

        key = float(ratio)
        if key not in self._codecs:
            artifact = self.require_artifact("kvtc")
            self._codecs[key] = KVTCCodec(artifact, key, self.adapter, sink=self.sink, window=self.window)
        return self._codecs[key]


@dataclass(frozen=True)
class MethodOutput:
    cache: DynamicCache
    stored_bytes: int  # bytes the method stores for the middle tokens, every byte counted
    bf16_bytes: int  # what those middle tokens occupy uncompressed in bf16


class CacheMethod:
    """Base of every method. Subclasses are small frozen dataclasses whose fields are the method's settings."""

    name: ClassVar[str]
    summary: ClassVar[str]
    takes_ratio: ClassVar[bool] = False  # False: a fixed-rate method, which reports the ratio it reaches
    needs_artifact: ClassVar[bool] = False
    needs_all_queries: ClassVar[bool] = False  # True: the prefill keeps every prefix query, not the last obs_window

    def check(self, ctx: MethodContext, ratio: float | None) -> None:
        """Raise a ``KvcalError`` before any work if this method cannot run at ``ratio``."""
        if self.needs_artifact:
            ctx.require_artifact(self.name)

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        raise NotImplementedError


def middle_bf16_bytes(ctx: MethodContext, pre: Prefilled) -> int:
    lo, hi = ctx.middle(pre.length)
    batch = pre.cache.layers[0].keys.shape[0]
    return (hi - lo) * batch * ctx.bf16_bytes_per_token()


def with_layers(cache: DynamicCache, replacements: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A new cache whose layers ``replacements`` hold new tensors; the others share the originals' tensors.

    Sharing is safe: cache layers grow by concatenation, which never writes into the tensors they hold.
    """
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for i, (k, v) in replacements.items():
        out.layers[i].keys, out.layers[i].values = k, v
    return out


def splice_middle(t: torch.Tensor, lo: int, hi: int, middle: torch.Tensor) -> torch.Tensor:
    """``t`` ``[b, h, n, d]`` with its tokens ``[lo, hi)`` replaced by ``middle`` (any length), in ``t``'s dtype."""
    return torch.cat([t[:, :, :lo], middle.to(t.dtype), t[:, :, hi:]], dim=2)
