"""RoPE over a whole PCA group's token rows ``[n, layers * heads, head_dim]`` at once (the codec's fast path).

``kvcal.adapters.base.rotate_into`` / ``unrotate_into`` define the arithmetic: per element the float32 expression
of the textbook form, ``(h * cos + rotate_half(h) * sin)`` and its inverse divided by ``cos^2 + sin^2``, each
product and sum rounded to float32 on its own (no fused multiply-add). On the CPU, for float32 rows, a compiled
loop (numba) computes exactly that in one pass over the rows, where torch's elementwise ops take seven passes and
two temporaries; it is checked bit for bit against the torch form (``tests/test_codec.py``). Elsewhere (CUDA, or
half-precision rows) the torch form runs.
"""

from __future__ import annotations

import numba
import torch

from kvcal.adapters.base import rotate_into, unrotate_into


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


@numba.njit(cache=True, nogil=True)
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


@numba.njit(cache=True, nogil=True)
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
