"""TurboQuant (Zandieh et al. 2025, arXiv 2504.19874): random rotation, then optimal scalar quantization.

Per token and KV head, the cached (post-RoPE) vector ``x`` of size ``d`` is stored as its norm (fp16) and the
codes of ``Π · x / |x|``, where ``Π`` is one fixed orthogonal matrix per ``d`` (QR of a seeded Gaussian). After a
random rotation every coordinate of a unit vector follows the same law, that of a coordinate of a uniformly
random unit vector in dimension ``d`` (density ∝ (1 - t²)^((d-3)/2), ≈ N(0, 1/d)), so one Lloyd–Max codebook for
that law, computed numerically once per ``(d, bits)``, quantizes them all near-optimally in MSE.

Fractional bit widths split the rotated coordinates, as in the paper: at 2.5 bits the first half of them get the
3-bit codebook and the rest the 2-bit one; at 3.5 bits, 4 and 3. Bytes: the codes of each bit width packed as one
stream per layer and tensor (``ceil(bits × count / 8)``, the codec's ``packed_size`` for 2/4/8 bits) plus one fp16
norm per token and head. That is TurboQuant-MSE (``turboquant-2.5``, ``turboquant-3.5``).

TurboQuant-prod (``turboquant-prod-2.5``, ``turboquant-prod-3.5``) is the paper's inner-product variant, for
keys, which attention only ever reads through inner products with queries: the keys get TurboQuant-MSE at one
bit less, and the residual ``r`` of each is stored as the 1-bit QJL sketch ``sign(S r)`` (``S`` a seeded Gaussian
``[d, d]``, arXiv 2406.03482) plus ``|r|`` in fp16; the key is restored as
``x_mse + sqrt(pi / 2) / d · |r| · Sᵀ sign(S r)``, whose inner product with any query is unbiased. Values, which
attention averages, keep TurboQuant-MSE at the full bit width. Bytes per key: ``(bits - 1) · d`` code bits,
``d`` sign bits and two fp16 norms.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcal.codec.rowwise import packed_size
from kvcal.errors import KvcalError
from kvcal.eval.methods.base import (
    FP16_BYTES,
    MethodContext,
)
from kvcal.eval.methods.quantized import RowwiseQuant

ROTATION_SEED = 0


@functools.cache
def rotation(d: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """The fixed random orthogonal ``[d, d]`` matrix (float32): Q of the QR of a seeded Gaussian, signs fixed
    by R's diagonal so Q is Haar-distributed and the same on every host."""
    g = torch.randn(d, d, generator=torch.Generator().manual_seed(seed + d), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))[None, :]).float()


@functools.cache
def lloyd_max_codebook(d: int, bits: int, grid: int = 1 << 16, iters: int = 300) -> torch.Tensor:
    """Lloyd–Max centroids (float32, ascending, ``2**bits``) for a coordinate of a uniform unit vector in R^d.

    Computed on a fine grid of the exact density ∝ (1 - t²)^((d-3)/2), deterministically (no sampling).
    """
    if d < 2 or not 1 <= bits <= 8:
        raise KvcalError(f"TurboQuant needs head_dim >= 2 and 1..8 bits per coordinate, got d={d}, bits={bits}")
    edge = min(1.0, 12.0 / math.sqrt(d))  # beyond 12 standard deviations the mass is negligible
    t = torch.linspace(-edge, edge, grid + 1, dtype=torch.float64)
    t = (t[1:] + t[:-1]) / 2  # cell midpoints: the density is finite there even for d = 2
    logw = 0.5 * (d - 3) * torch.log1p(-t * t)
    w = torch.exp(logw - logw.max())
    cw, cwt = torch.cumsum(w, 0), torch.cumsum(w * t, 0)
    zero = torch.zeros(1, dtype=torch.float64)
    cw, cwt = torch.cat([zero, cw]), torch.cat([zero, cwt])
    k = 1 << bits
    # Start from the centroids of equal-mass cells, then alternate boundaries (midpoints) and centroids.
    cdf = cw[1:] / cw[-1]
    bounds = torch.searchsorted(cdf, torch.arange(1, k, dtype=torch.float64) / k)
    for _ in range(iters):
        edges = torch.cat([torch.zeros(1, dtype=torch.long), bounds, torch.tensor([t.numel()])])
        mass = cw[edges[1:]] - cw[edges[:-1]]
        centroids = (cwt[edges[1:]] - cwt[edges[:-1]]) / mass.clamp_min(1e-300)
        new = torch.searchsorted(t, (centroids[1:] + centroids[:-1]) / 2)
        if torch.equal(new, bounds):
            break
        bounds = new
    return ((centroids - centroids.flip(0)) / 2).float()  # the law is symmetric: remove the grid's last ulps


def bit_split(d: int, bits: float) -> tuple[int, int, int]:
    """``(n_hi, hi, lo)``: the first ``n_hi`` rotated coordinates get ``hi`` bits, the other ``d - n_hi`` get ``lo``."""
    lo = math.floor(bits)
    if not 1 <= lo or bits > 8:
        raise KvcalError(f"TurboQuant takes 1 to 8 bits per coordinate, got {bits}")
    n_hi = round((bits - lo) * d)
    if abs(n_hi * (lo + 1) + (d - n_hi) * lo - bits * d) > 1e-9:
        raise KvcalError(f"{bits} bits per coordinate cannot be split over {d} coordinates")
    return n_hi, lo + 1, lo


def code_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` packed codes of ``bits`` bits (``packed_size`` where the codec packs that width)."""
    return packed_size(count, bits) if bits in (2, 4, 8) else (count * bits + 7) // 8


def _quantize_coords(y: torch.Tensor, d: int, bits: int) -> torch.Tensor:
    book = lloyd_max_codebook(d, bits).to(y.device)
    codes = torch.bucketize(y, (book[1:] + book[:-1]) / 2)
    return book[codes]


@dataclass(frozen=True)
class TurboRows:
    values: torch.Tensor  # reconstruction, float32, same shape as the rows
    stored_bytes: int


def turboquant_rows(rows: torch.Tensor, bits: float, seed: int = ROTATION_SEED) -> TurboRows:
    """Quantize each row of ``rows`` ``[n, d]``: fp16 norm + Lloyd–Max codes of the rotated unit vector."""
    n, d = rows.shape
    n_hi, hi, lo = bit_split(d, bits)
    x = rows.float()
    norm = x.norm(dim=-1, keepdim=True)
    stored_norm = norm.half().float()
    pi = rotation(d, seed).to(x.device)
    y = (x / norm.clamp_min(torch.finfo(torch.float32).tiny)) @ pi.T
    parts, stored = [], n * FP16_BYTES
    for cols, b in ((slice(0, n_hi), hi), (slice(n_hi, d), lo)):
        if cols.stop > cols.start:
            parts.append(_quantize_coords(y[:, cols].contiguous(), d, b))
            stored += code_bytes(n * (cols.stop - cols.start), b)
    recon = (torch.cat(parts, dim=-1) @ pi) * stored_norm
    return TurboRows(recon, stored)


@functools.cache
def qjl_projection(d: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """The fixed QJL matrix ``S`` ``[d, d]`` (float32) with i.i.d. N(0, 1) entries, seeded apart from the rotation."""
    return torch.randn(d, d, generator=torch.Generator().manual_seed(10_000 + seed + d), dtype=torch.float64).float()


def turboquant_prod_rows(rows: torch.Tensor, bits: float, seed: int = ROTATION_SEED) -> TurboRows:
    """TurboQuant-prod of each row of ``rows`` ``[n, d]``: MSE codes at ``bits - 1`` plus the QJL sketch of the
    residual and its fp16 norm, restored so that inner products with the rows are unbiased."""
    if bits < 2:
        raise KvcalError(f"TurboQuant-prod needs at least 2 bits per coordinate (1 of them for QJL), got {bits}")
    n, d = rows.shape
    mse = turboquant_rows(rows, bits - 1, seed)
    residual = rows.float() - mse.values
    gamma = residual.norm(dim=-1, keepdim=True).half().float()
    s = qjl_projection(d, seed).to(rows.device)
    signs = torch.where(residual @ s.T >= 0, 1.0, -1.0)
    recon = mse.values + math.sqrt(math.pi / 2) / d * gamma * (signs @ s)
    return TurboRows(recon, mse.stored_bytes + (n * d + 7) // 8 + n * FP16_BYTES)


@dataclass(frozen=True)
class TurboQuant(RowwiseQuant):
    """TurboQuant-MSE on keys and values per token and KV head, at ``bits`` bits per coordinate plus an fp16 norm.

    A fixed-rate method: it reports the ratio it reaches, ``16 d / (bits · d + 16)`` against bf16. No QJL residual.
    """

    bits: float = 3.5
    seed: int = ROTATION_SEED

    def check(self, ctx: MethodContext, ratio: float | None) -> None:
        for d in {ctx.layout.head_dim, ctx.layout.v_head_dim}:
            bit_split(d, self.bits)

    def code_rows(self, rows: torch.Tensor):
        return turboquant_rows(rows, self.bits, self.seed)


@dataclass(frozen=True)
class TurboQuant25(TurboQuant):
    name: ClassVar[str] = "turboquant-2.5"
    summary: ClassVar[str] = "TurboQuant-MSE 2.5 bits: random rotation, Lloyd-Max codes (half 3-bit, half 2-bit), fp16 norm"
    bits: float = 2.5


@dataclass(frozen=True)
class TurboQuant35(TurboQuant):
    name: ClassVar[str] = "turboquant-3.5"
    summary: ClassVar[str] = "TurboQuant-MSE 3.5 bits: random rotation, Lloyd-Max codes (half 4-bit, half 3-bit), fp16 norm"
    bits: float = 3.5


@dataclass(frozen=True)
class TurboQuantProd(TurboQuant):
    """TurboQuant-prod on keys (MSE codes at ``bits - 1``, 1-bit QJL residual, two fp16 norms) and TurboQuant-MSE
    on values at ``bits``. A fixed-rate method."""

    def check(self, ctx: MethodContext, ratio: float | None) -> None:
        bit_split(ctx.layout.head_dim, self.bits - 1)
        bit_split(ctx.layout.v_head_dim, self.bits)

    def code_rows_of(self, kind: str, rows: torch.Tensor):
        if kind == "keys":
            return turboquant_prod_rows(rows, self.bits, self.seed)
        return turboquant_rows(rows, self.bits, self.seed)


@dataclass(frozen=True)
class TurboQuantProd25(TurboQuantProd):
    name: ClassVar[str] = "turboquant-prod-2.5"
    summary: ClassVar[str] = "TurboQuant-prod 2.5 bits: keys 1.5-bit MSE codes + 1-bit QJL residual, values TurboQuant-MSE"
    bits: float = 2.5


@dataclass(frozen=True)
class TurboQuantProd35(TurboQuantProd):
    name: ClassVar[str] = "turboquant-prod-3.5"
    summary: ClassVar[str] = "TurboQuant-prod 3.5 bits: keys 2.5-bit MSE codes + 1-bit QJL residual, values TurboQuant-MSE"
    bits: float = 3.5
