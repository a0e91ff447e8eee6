"""RoPE over a whole PCA group's token rows ``[n, layers * heads, head_dim]`` at once (the codec's fast path).

``kvcal.adapters.base.rotate_into`` / ``unrotate_into`` define the arithmetic: per element the float32 expression
of the textbook form, ``(h * cos + rotate_half(h) * sin)`` and its inverse divided by ``cos^2 + sin^2``, each
product and sum rounded to float32 on its own (no fused multiply-add). On the CPU, for float32 rows, a compiled
loop (numba) computes exactly that in one pass over the rows, where torch's elementwise ops take seven passes and
two temporaries; it is checked bit for bit against the torch form (``tests/test_codec.py``). Elsewhere (CUDA, or
half-precision rows) the torch form runs.

The codec's CPU path goes one step further (``gather_centred_rows`` / ``scatter_rotated_rows``): one compiled pass
over a group's rows reads the cache tensors themselves (float32, bfloat16 or float16, widened exactly), un-rotates,
subtracts the group's mean and checks that every value read is finite (compress), or rotates decoded rows straight
into the cache tensors, rounding to their dtype as torch does (decompress). Same arithmetic, same bits as gathering,
converting, un-rotating and centring one after the other, in one pass over memory instead of four. Token-major:
each row is written (or read) once, front to back, which measured 2.5x faster than layer by layer.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from kvcal.adapters.base import rotate_into, unrotate_into
from kvcal.codec.geometry import host_bits


def _compiled_path(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def unrotate_rows(out: torch.Tensor, raw: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE rows into ``out`` from cached (rotated) rows ``raw`` ``[n, m, d]``; ``cos``/``sin`` ``[n, rot]``."""
    norm = cos * cos + sin * sin  # as the adapter's ``_rope_factors`` makes it
    if _compiled_path(out, raw, cos, sin):
        _unrotate(raw.numpy(), cos.numpy(), sin.numpy(), norm.numpy(), out.numpy())
        return out
    rot = cos.shape[-1]
    if rot < raw.shape[-1]:
        out[..., rot:] = raw[..., rot:]
    unrotate_into(out[..., :rot], raw[..., :rot], cos[:, None], sin[:, None], norm[:, None])
    return out


def rotate_rows(out: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rows as the cache holds them (RoPE applied) into ``out`` from pre-RoPE ``rows`` ``[n, m, d]``."""
    if _compiled_path(out, rows, cos, sin):
        _rotate(rows.numpy(), cos.numpy(), sin.numpy(), out.numpy())
        return out
    return rotate_into(out, rows, cos[:, None], sin[:, None])


def fused_layer_path(t: torch.Tensor) -> bool:
    """Whether a cache tensor ``[batch, heads, tokens, dims]`` can be read or written by the fused kernels (float32,
    bfloat16 or float16, contiguous, on the CPU)."""
    return t.device.type == "cpu" and t.dtype in _FORMATS and t.is_contiguous()


# The format code the kernels widen and narrow a cache tensor's words by: float32 as it is, bfloat16 as a float32's
# top half, float16 by its own exponent and mantissa.
_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _words(layers: list[torch.Tensor]) -> tuple[tuple[np.ndarray, ...], int]:
    """The layers' elements as unsigned integer words (``host_bits``, viewed unsigned) and their format code."""
    return tuple(host_bits(t).view(f"u{t.element_size()}") for t in layers), _FORMATS[layers[0].dtype]


def gather_centred_rows(out: torch.Tensor, layers: list[torch.Tensor], lo: int, cos: torch.Tensor, sin: torch.Tensor,
                        mean: torch.Tensor) -> bool:
    """``out[t] = concat over layers and heads of unrotate(layer[h, lo + t]) - mean`` for the ``n = len(out)`` tokens
    from ``lo``: one batch item of a group, each layer ``[heads, tokens, d]`` as the cache holds it
    (``fused_layer_path``), ``out`` the group's float32 rows ``[n, p]``, ``cos``/``sin`` ``[n, rot]`` (``rot`` = 0:
    no RoPE). Returns whether every value read was finite. Token-major: each row is written once, front to back."""
    words, fmt = _words(layers)
    if cos.shape[1]:
        top = _gather_centred_rope(words, fmt, lo, cos.numpy(), sin.numpy(), mean.numpy(), out.numpy())
    else:
        top = _gather_centred_plain(words, fmt, lo, mean.numpy(), out.numpy())
    return top < _EXPONENT_ALL_ONES


def scatter_rotated_rows(layers: list[torch.Tensor], lo: int, rows: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> None:
    """``layer[h, lo + t] = rotate(rows[t, (layer, h) block])``: decoded float32 rows ``[n, p]`` of one batch item
    into its layers' cache tensors ``[heads, tokens, d]`` (``fused_layer_path``; half precision rounded to nearest
    even, as torch's conversions), with RoPE re-applied. Token-major: each decoded row is read once, front to back."""
    words, fmt = _words(layers)
    if cos.shape[1]:
        _scatter_rotated(rows.numpy(), cos.numpy(), sin.numpy(), words, fmt, lo)
    else:
        _scatter_plain(rows.numpy(), words, fmt, lo)


# The kernels use numpy's error model: with Python's, every division checks its divisor for zero (the RoPE norm
# is cos^2 + sin^2, never zero), and that branch keeps the compiler from vectorising the loop (measured 2x).
_EXPONENT_ALL_ONES = 0x7F800000  # |float32 bits| at or above it: inf or NaN


@numba.njit(inline="always")
def _widen(src, fmt, x32, scratch):  # pragma: no cover - compiled
    # One row of cache words into float32 bits, exactly; returns the row's largest |bits| (inf or NaN: >= 2^31 -
    # 2^23). Loops of selects rather than branches, so that they vectorise.
    d = src.shape[0]
    if fmt == 0:  # float32
        for i in range(d):
            x32[i] = src[i]
    elif fmt == 1:  # bfloat16: the top half of a float32
        for i in range(d):
            x32[i] = np.uint32(src[i]) << np.uint32(16)
    else:  # float16: rebias the exponent; subnormals via an exact float product; inf and NaN keep their payload
        sub = scratch.view(np.float32)
        for i in range(d):
            sub[i] = np.float32(np.int64(src[i]) & 0x3FF) * np.float32(5.9604644775390625e-08)  # m * 2^-24
        for i in range(d):
            h = np.int64(src[i])
            sign = (h & 0x8000) << 16
            e = h & 0x7C00
            normal = ((h & 0x7FFF) << 13) + (112 << 23)
            special = ((h & 0x3FF) << 13) | 0x7F800000
            body = special if e == 0x7C00 else (normal if e != 0 else np.int64(scratch[i]))
            x32[i] = np.uint32(sign | body)
    top = np.uint32(0)
    for i in range(d):
        top = max(top, x32[i] & np.uint32(0x7FFFFFFF))
    return top


@numba.njit(inline="always")
def _narrow(x32, fmt, dst, scratch):  # pragma: no cover - compiled
    # float32 bits into one row of cache words, rounded to nearest even as torch's conversions round (NaN: the
    # canonical quiet NaN of the format).
    d = dst.shape[0]
    if fmt == 0:
        for i in range(d):
            dst[i] = x32[i]
    elif fmt == 1:
        for i in range(d):
            u = np.int64(x32[i])
            rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            dst[i] = np.uint16(0x7FC0 if (u & 0x7FFFFFFF) > 0x7F800000 else rounded)
    else:
        # float16: subnormal results by one float addition of 0.5, whose rounding is the format's (ryg's method).
        sub = scratch.view(np.float32)
        x = x32.view(np.float32)
        for i in range(d):
            sub[i] = abs(x[i]) + np.float32(0.5)
        for i in range(d):
            u = np.int64(x32[i])
            f = u & 0x7FFFFFFF
            normal = (f - 0x38000000 + 0xFFF + ((f >> 13) & 1)) >> 13
            subnormal = np.int64(scratch[i]) - 0x3F000000
            big = 0x7E00 if f > 0x7F800000 else 0x7C00
            body = big if f >= 0x47800000 else (subnormal if f < 0x38800000 else normal)
            dst[i] = np.uint16(((u >> 16) & 0x8000) | body)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _gather_centred_rope(srcs, fmt, lo, cos, sin, mean, out):  # pragma: no cover - compiled
    n = out.shape[0]
    rot = cos.shape[1]
    half = rot // 2
    top = np.uint32(0)
    x32 = np.empty(srcs[0].shape[2], dtype=np.uint32)
    scratch = np.empty_like(x32)
    x = x32.view(np.float32)
    nt = np.empty(rot, dtype=np.float32)
    for t in range(n):
        ct, st, row = cos[t], sin[t], out[t]
        for i in range(rot):  # as the adapter's ``_rope_factors`` makes it: two products and a sum, each rounded
            nt[i] = ct[i] * ct[i] + st[i] * st[i]
        c = 0
        for layer in range(len(srcs)):
            src = srcs[layer]
            heads, _, d = src.shape
            for h in range(heads):
                top = max(top, _widen(src[h, lo + t], fmt, x32, scratch))
                o, m = row[c : c + d], mean[c : c + d]
                for i in range(half):  # two loops over contiguous dims, so that each vectorises
                    o[i] = (x[i] * ct[i] + x[i + half] * st[i]) / nt[i] - m[i]
                for i in range(half):
                    o[i + half] = (x[i + half] * ct[i + half] - x[i] * st[i + half]) / nt[i + half] - m[i + half]
                for i in range(rot, d):
                    o[i] = x[i] - m[i]
                c += d
    return top


# The plain (no RoPE) kernels share the RoPE kernels' loops but not their body: the RoPE kernels with rot = 0 ran
# 30 % slower (measured, float32 and bfloat16), the RoPE loops' bounds keeping the copy from vectorising as well.
@numba.njit(cache=True, nogil=True, error_model="numpy")
def _gather_centred_plain(srcs, fmt, lo, mean, out):  # pragma: no cover - compiled
    n = out.shape[0]
    top = np.uint32(0)
    x32 = np.empty(srcs[0].shape[2], dtype=np.uint32)
    scratch = np.empty_like(x32)
    x = x32.view(np.float32)
    for t in range(n):
        row = out[t]
        c = 0
        for layer in range(len(srcs)):
            src = srcs[layer]
            heads, _, d = src.shape
            for h in range(heads):
                top = max(top, _widen(src[h, lo + t], fmt, x32, scratch))
                o, m = row[c : c + d], mean[c : c + d]
                for i in range(d):
                    o[i] = x[i] - m[i]
                c += d
    return top


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _scatter_rotated(rows, cos, sin, dsts, fmt, lo):  # pragma: no cover - compiled
    n = rows.shape[0]
    rot = cos.shape[1]
    half = rot // 2
    o32 = np.empty(dsts[0].shape[2], dtype=np.uint32)
    scratch = np.empty_like(o32)
    o = o32.view(np.float32)
    for t in range(n):
        ct, st, row = cos[t], sin[t], rows[t]
        c = 0
        for layer in range(len(dsts)):
            dst = dsts[layer]
            heads, _, d = dst.shape
            for h in range(heads):
                x = row[c : c + d]
                for i in range(half):
                    o[i] = x[i] * ct[i] - x[i + half] * st[i]
                for i in range(half):
                    o[i + half] = x[i + half] * ct[i + half] + x[i] * st[i + half]
                for i in range(rot, d):
                    o[i] = x[i]
                _narrow(o32, fmt, dst[h, lo + t], scratch)
                c += d


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _scatter_plain(rows, dsts, fmt, lo):  # pragma: no cover - compiled
    n = rows.shape[0]
    scratch = np.empty(dsts[0].shape[2], dtype=np.uint32)
    for t in range(n):
        row = rows[t]
        c = 0
        for layer in range(len(dsts)):
            dst = dsts[layer]
            heads, _, d = dst.shape
            for h in range(heads):
                _narrow(row[c : c + d].view(np.uint32), fmt, dst[h, lo + t], scratch)
                c += d


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _unrotate(raw, cos, sin, norm, out):  # pragma: no cover - compiled
    n, m, d = raw.shape
    rot = cos.shape[1]
    half = rot // 2
    for t in range(n):
        for h in range(m):
            for i in range(half):  # innermost over contiguous dims: the compiler vectorises it
                x1, x2 = raw[t, h, i], raw[t, h, i + half]
                out[t, h, i] = (x1 * cos[t, i] + x2 * sin[t, i]) / norm[t, i]
                out[t, h, i + half] = (x2 * cos[t, i + half] - x1 * sin[t, i + half]) / norm[t, i + half]
            for i in range(rot, d):
                out[t, h, i] = raw[t, h, i]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _rotate(rows, cos, sin, out):  # pragma: no cover - compiled
    n, m, d = rows.shape
    rot = cos.shape[1]
    half = rot // 2
    for t in range(n):
        for h in range(m):
            for i in range(half):
                x1, x2 = rows[t, h, i], rows[t, h, i + half]
                out[t, h, i] = x1 * cos[t, i] - x2 * sin[t, i]
                out[t, h, i + half] = x2 * cos[t, i + half] + x1 * sin[t, i + half]
            for i in range(rot, d):
                out[t, h, i] = rows[t, h, i]
