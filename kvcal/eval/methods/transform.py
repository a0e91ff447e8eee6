"""Methods that use the calibration artifact's PCA bases: plain truncation, KVTC, and KVTC after eviction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcal.codec.transform import projection_for
from kvcal.errors import RatioError
from kvcal.eval.methods.base import (
    BF16_BYTES,
    CacheMethod,
    MethodContext,
    MethodOutput,
    Prefilled,
    middle_bf16_bytes,
    splice_middle,
    with_layers,
)
from kvcal.eval.methods.eviction import check_eviction_ratio, snapkv_scores

KINDS = ("k", "v")


def group_rows(ctx: MethodContext, pre: Prefilled, kind: str, g: int) -> torch.Tensor:
    """Middle tokens of PCA group ``g`` as rows ``[batch * middle, p]``, position-free like the codec's."""
    lo, hi = ctx.middle(pre.length)
    parts = []
    for layer in ctx.artifact.groups[g]:
        lay = pre.cache.layers[layer]
        t = (lay.keys if kind == "k" else lay.values)[:, :, lo:hi]
        t = ctx.adapter.position_free(kind, t, layer, pre.positions(lo, hi))
        b, h, m, d = t.shape
        parts.append(t.permute(0, 2, 1, 3).reshape(b * m, h * d))
    return torch.cat(parts, dim=1)


def rows_to_layers(ctx: MethodContext, pre: Prefilled, kind: str, g: int, rows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Inverse of ``group_rows``: ``{layer: [b, heads, middle, d]}``, RoPE re-applied at their positions."""
    lo, hi = ctx.middle(pre.length)
    b, m = pre.cache.layers[0].keys.shape[0], hi - lo
    out, col = {}, 0
    for layer in ctx.artifact.groups[g]:
        ref = getattr(pre.cache.layers[layer], "keys" if kind == "k" else "values")
        h, d = ref.shape[1], ref.shape[3]
        t = rows[:, col : col + h * d].reshape(b, m, h, d).permute(0, 2, 1, 3)
        col += h * d
        out[layer] = ctx.adapter.at_positions(kind, t, layer, pre.positions(lo, hi))
    return out


@dataclass(frozen=True)
class PcaTruncation(CacheMethod):
    """Keep the top ``k = round(p / ratio)`` PCA coordinates of each group in bf16, drop the rest; no quantization.

    The coordinates are the artifact's (in its metric's space, so "top" means most output error removed).

    ``k`` is capped by the basis columns the artifact stores (the most any of its ratios uses), so at low
    ratios the measured ratio can exceed the target: the row reports the measured one.
    """

    name: ClassVar[str] = "pca"
    summary: ClassVar[str] = "PCA truncation: top coordinates of the artifact basis kept in bf16"
    takes_ratio: ClassVar[bool] = True
    needs_artifact: ClassVar[bool] = True

    def check(self, ctx: MethodContext, ratio: float | None) -> None:
        super().check(ctx, ratio)
        check_eviction_ratio(self.name, ratio)

    def kept_rank(self, ctx: MethodContext, kind: str, g: int, ratio: float) -> int:
        basis = ctx.artifact.basis(kind, g)
        return max(1, min(basis.shape[1], round(basis.shape[0] / ratio)))

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        lo, hi = ctx.middle(pre.length)
        restored: dict[int, dict[str, torch.Tensor]] = {}
        stored = 0
        for kind in KINDS:
            for g in range(len(ctx.artifact.groups)):
                rows = group_rows(ctx, pre, kind, g)
                k = self.kept_rank(ctx, kind, g, ratio)
                projection = projection_for(ctx.artifact, kind, g, torch.arange(k)).to(rows.device)
                coords = projection.project(rows).to(torch.bfloat16).float()  # what would be stored
                stored += coords.numel() * BF16_BYTES
                decoded = coords @ projection.decoder + projection.mean
                for layer, t in rows_to_layers(ctx, pre, kind, g, decoded).items():
                    restored.setdefault(layer, {})[kind] = t
        replaced = {}
        for layer, kv in restored.items():
            lay = pre.cache.layers[layer]
            replaced[layer] = (splice_middle(lay.keys, lo, hi, kv["k"]), splice_middle(lay.values, lo, hi, kv["v"]))
        return MethodOutput(with_layers(pre.cache, replaced), stored, middle_bf16_bytes(ctx, pre))


@dataclass(frozen=True)
class Kvtc(CacheMethod):
    """The KVTC codec at one of the artifact's ratios; bytes are the blob's middle sections (``stats()``)."""

    name: ClassVar[str] = "kvtc"
    summary: ClassVar[str] = "KVTC v2: weighted PCA + calibrated steps + ANS (the kvcal codec)"
    takes_ratio: ClassVar[bool] = True
    needs_artifact: ClassVar[bool] = True

    def check(self, ctx: MethodContext, ratio: float | None) -> None:
        super().check(ctx, ratio)
        if ratio is None:
            raise RatioError("kvtc needs a ratio; pass --ratio with one of the artifact's ratios")
        ctx.artifact.check_ratio(ratio)

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        codec = ctx.codec(ratio)
        blob = codec.compress(pre.cache)
        stats = codec.stats(blob)
        restored = codec.decompress(blob, pre.cache.layers[0].keys.device)
        return MethodOutput(restored, stats["middle_bytes"], stats["middle_bf16_bytes"])


def pyramid_union(scores: dict[int, torch.Tensor], weights: dict[int, float], count: int) -> torch.Tensor:
    """Sorted indices ``[batch, count]``: the union of every layer's top tokens, each layer's share ∝ its weight.

    Layer ``l``'s ``i``-th best token gets priority ``(i + 1) / w_l``; taking the ``count`` tokens whose best
    priority over layers is smallest is exactly the union of every layer's top ``b_l ∝ w_l`` tokens, grown
    until the union holds ``count`` tokens.
    """
    best = None
    for layer, s in scores.items():
        w = weights[layer]
        if w <= 0:
            continue
        rank = s.argsort(dim=-1, descending=True).argsort(dim=-1)  # rank of each token in this layer
        priority = (rank + 1).double() / w
        best = priority if best is None else torch.minimum(best, priority)
    if best is None:  # every weight is zero: fall back to equal shares
        return pyramid_union(scores, {layer: 1.0 for layer in scores}, count)
    return best.topk(count, dim=-1, largest=False).indices.sort(dim=-1).values


@dataclass(frozen=True)
class KvtcPyramidKV(CacheMethod):
    """Evict with PyramidKV-shaped selection at a mild keep fraction, then KVTC-code the tokens that remain.

    At target ratio ``R`` the codec runs at the artifact ratio nearest ``R × keep_fraction`` (not above ``R``)
    and the eviction keeps ``f = codec ratio / R`` of the middle, so together they meet ``R``.
    The cross-layer PCA codes a token across all layers at once, so the kept set must be shared: each layer
    ranks tokens by its SnapKV score and contributes in proportion to its PyramidKV weight; a token any layer
    keeps is stored once, for every layer (and every layer keeps it, since it is paid for).
    Kept tokens are packed contiguously and re-rotated to the packed positions, so the codec recovers their
    true position-free vectors; after decoding they go back to their true positions.
    Bytes: the blob's middle sections plus a bitmap of kept positions (``ceil(middle / 8)`` per sequence).
    """

    name: ClassVar[str] = "kvtc+pyramidkv"
    summary: ClassVar[str] = "PyramidKV-shaped eviction (mild) followed by KVTC on the kept tokens"
    takes_ratio: ClassVar[bool] = True
    needs_artifact: ClassVar[bool] = True
    keep_fraction: float = 0.5
    pool_kernel: int = 7

    def plan(self, ctx: MethodContext, ratio: float) -> tuple[float, float]:
        """``(codec ratio, keep fraction)`` for target ``ratio``."""
        options = [r for r in ctx.artifact.ratios if r <= ratio]
        if not options:
            have = ", ".join(f"{r:g}" for r in ctx.artifact.ratios)
            raise RatioError(f"kvtc+pyramidkv at ratio {ratio:g} needs an artifact ratio <= {ratio:g} (it has {have})")
        target = ratio * self.keep_fraction
        codec_ratio = min(options, key=lambda r: abs(math.log(r / target)))
        return codec_ratio, codec_ratio / ratio

    def check(self, ctx: MethodContext, ratio: float | None) -> None:
        super().check(ctx, ratio)
        self.plan(ctx, check_eviction_ratio(self.name, ratio))

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        codec_ratio, keep = self.plan(ctx, ratio)
        lo, hi = ctx.middle(pre.length)
        count = min(hi - lo, max(1, round(keep * (hi - lo))))
        scores = {layer: snapkv_scores(pre, ctx, layer, self.pool_kernel).sum(1) for layer in ctx.coded_layers}
        weights = ctx.artifact.budget_weights()
        idx = pyramid_union(scores, {layer: float(weights[layer]) for layer in ctx.coded_layers}, count)
        true_pos = idx + lo
        packed_pos = pre.positions(lo, lo + count)

        def move(kind: str, t: torch.Tensor, layer: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
            return ctx.adapter.at_positions(kind, ctx.adapter.position_free(kind, t, layer, src), layer, dst)

        packed = {}
        for layer in ctx.coded_layers:
            lay = pre.cache.layers[layer]
            kept = [t[:, :, lo:hi].gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))
                    for t in (lay.keys, lay.values)]
            k, v = (move(kind, t, layer, true_pos, packed_pos) for kind, t in zip(KINDS, kept))
            packed[layer] = (splice_middle(lay.keys, lo, hi, k), splice_middle(lay.values, lo, hi, v))
        # Sliding-window layers are restored from the original below; the codec only needs them no longer than
        # the packed sequence (its header requires that), and their exact bytes are not middle bytes.
        packed_len = pre.length - (hi - lo) + count
        for layer in ctx.layout.exact_layers:
            lay = pre.cache.layers[layer]
            packed[layer] = (lay.keys[:, :, -packed_len:], lay.values[:, :, -packed_len:])
        codec = ctx.codec(codec_ratio)
        blob = codec.compress(with_layers(pre.cache, packed))
        stats = codec.stats(blob)
        decoded = codec.decompress(blob, pre.cache.layers[0].keys.device)

        restored = {}
        for layer in ctx.coded_layers:
            dk, dv = decoded.layers[layer].keys, decoded.layers[layer].values
            k, v = (splice_middle(t, lo, lo + count, move(kind, t[:, :, lo : lo + count], layer, packed_pos, true_pos))
                    for kind, t in zip(KINDS, (dk, dv)))
            restored[layer] = (k, v)
        bitmap = idx.shape[0] * math.ceil((hi - lo) / 8)
        return MethodOutput(with_layers(pre.cache, restored), stats["middle_bytes"] + bitmap, middle_bf16_bytes(ctx, pre))
