"""Fixed-rate baselines: the uncompressed cache and plain quantization of the cached tensors.

Every quantizer here is the codec's own (``kvcal.codec.rowwise``: fp16 shift and scale rounded so nothing
clips), applied to the cached (post-RoPE) tensors as a serving system would. Bytes are counted from what
would be stored: packed codes plus every fp16 shift and scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcal.codec.rowwise import PAYLOAD_BITS, dequantize, packed_size, quantize
from kvcal.eval.methods.base import (
    BF16_BYTES,
    FP16_BYTES,
    CacheMethod,
    MethodContext,
    MethodOutput,
    Prefilled,
    middle_bf16_bytes,
    splice_middle,
    with_layers,
)


@dataclass(frozen=True)
class QuantizedRows:
    values: torch.Tensor  # reconstruction, float32, same shape as the rows
    stored_bytes: int


def quantize_rows(rows: torch.Tensor, qtype: str) -> QuantizedRows:
    """Quantize each row of ``rows`` ``[n, size]`` with its own scale (and shift, for integer types)."""
    q = quantize(rows, qtype)
    meta = q.scale.numel() + (0 if qtype == "fp8" else q.shift.numel())
    stored = packed_size(q.codes.numel(), PAYLOAD_BITS[qtype]) + meta * FP16_BYTES
    return QuantizedRows(dequantize(q, qtype), stored)


@dataclass(frozen=True)
class Uncompressed(CacheMethod):
    name: ClassVar[str] = "uncompressed"
    summary: ClassVar[str] = "the prefilled cache as is (ratio 1 against bf16)"

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        bf16 = middle_bf16_bytes(ctx, pre)
        return MethodOutput(with_layers(pre.cache, {}), bf16, bf16)


@dataclass(frozen=True)
class RowwiseQuant(CacheMethod):
    """Quantizes every middle token of every KV head as one row; subclasses say how a batch of rows is coded."""

    def code_rows(self, rows: torch.Tensor) -> QuantizedRows:
        raise NotImplementedError

    def code_rows_of(self, kind: str, rows: torch.Tensor) -> QuantizedRows:
        """Rows of ``kind`` (``"keys"`` or ``"values"``); a method that treats the two differently overrides this."""
        return self.code_rows(rows)

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        lo, hi = ctx.middle(pre.length)
        stored, replaced = 0, {}
        for layer in ctx.coded_layers:
            lay = pre.cache.layers[layer]
            new = []
            for kind, t in (("keys", lay.keys), ("values", lay.values)):
                mid = t[:, :, lo:hi].float()
                q = self.code_rows_of(kind, mid.reshape(-1, mid.shape[-1]))
                stored += q.stored_bytes
                new.append(splice_middle(t, lo, hi, q.values.reshape(mid.shape)))
            replaced[layer] = (new[0], new[1])
        return MethodOutput(with_layers(pre.cache, replaced), stored, middle_bf16_bytes(ctx, pre))


@dataclass(frozen=True)
class PerTokenQuant(RowwiseQuant):
    """Each token of each head quantized on its own (group = head_dim), keys and values alike."""

    qtype: str = "int8"

    def code_rows(self, rows: torch.Tensor) -> QuantizedRows:
        return quantize_rows(rows, self.qtype)


@dataclass(frozen=True)
class Fp8PerToken(PerTokenQuant):
    name: ClassVar[str] = "fp8"
    summary: ClassVar[str] = "e4m3 per token and head, one fp16 scale"
    qtype: str = "fp8"


@dataclass(frozen=True)
class Int8PerToken(PerTokenQuant):
    name: ClassVar[str] = "int8"
    summary: ClassVar[str] = "asymmetric int8 per token and head, fp16 shift + scale"
    qtype: str = "int8"


@dataclass(frozen=True)
class Int4PerToken(PerTokenQuant):
    name: ClassVar[str] = "int4"
    summary: ClassVar[str] = "asymmetric int4 per token and head, fp16 shift + scale"
    qtype: str = "int4"


@dataclass(frozen=True)
class Kivi2(CacheMethod):
    """KIVI (Liu et al. 2024) at 2 bits: keys per channel over groups of ``group`` tokens, values per token.

    Values are quantized per token in groups of ``group`` channels. KIVI keeps a full-precision residual of
    recent tokens; here that residual is the recent window every method keeps exact, plus the last
    ``middle mod group`` middle tokens, which do not fill a key group yet and stay exact (billed at bf16), as in
    KIVI where they would still sit in the residual.
    """

    name: ClassVar[str] = "kivi2"
    summary: ClassVar[str] = "KIVI 2-bit: keys per channel (groups of 32 tokens), values per token (groups of 32)"
    group: int = 32
    qtype: str = "int2"

    def _keys(self, mid: torch.Tensor) -> tuple[torch.Tensor, int]:
        b, h, m, d = mid.shape
        full = (m // self.group) * self.group
        blocks = mid[:, :, :full].reshape(b, h, full // self.group, self.group, d).transpose(-1, -2)
        q = quantize_rows(blocks.reshape(-1, self.group), self.qtype)
        recon = q.values.reshape(blocks.shape).transpose(-1, -2).reshape(b, h, full, d)
        residual = mid[:, :, full:]
        return torch.cat([recon, residual], dim=2), q.stored_bytes + residual.numel() * BF16_BYTES

    def _values(self, mid: torch.Tensor) -> tuple[torch.Tensor, int]:
        parts, stored = [], 0
        for c in range(0, mid.shape[-1], self.group):
            chunk = mid[..., c : c + self.group]
            q = quantize_rows(chunk.reshape(-1, chunk.shape[-1]), self.qtype)
            parts.append(q.values.reshape(chunk.shape))
            stored += q.stored_bytes
        return torch.cat(parts, dim=-1), stored

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        lo, hi = ctx.middle(pre.length)
        stored, replaced = 0, {}
        for layer in ctx.coded_layers:
            lay = pre.cache.layers[layer]
            k, k_bytes = self._keys(lay.keys[:, :, lo:hi].float())
            v, v_bytes = self._values(lay.values[:, :, lo:hi].float())
            stored += k_bytes + v_bytes
            replaced[layer] = (splice_middle(lay.keys, lo, hi, k), splice_middle(lay.values, lo, hi, v))
        return MethodOutput(with_layers(pre.cache, replaced), stored, middle_bf16_bytes(ctx, pre))
