"""The error that matters: key errors through the queries that read them, value errors through ``o_proj``.

For one KV head ``h`` of one layer, a key error ``e`` (pre-RoPE) moves the score a query ``q`` gives that token by
``s * q'. e``, where ``q'`` is ``q`` rotated by the relative RoPE offset and ``s`` the attention scale; a value
error ``d`` moves the layer output by ``W_o d`` (through the ``o_proj`` columns of every query head in the group).
Both perturb the output of attention, and to first order, for a token of attention weight ``p``:

    value error ``d``:  ``p^2 * d^T G d``                       with ``G = sum_g W_o,g^T W_o,g``
    key error ``e``:    ``p^2 * s^2 * tr(G Cov_v) * e^T M e``    with ``M = E[q' q'^T]`` (``QueryMoments``)

(a score error ``eps`` moves the output by ``p * eps * W_o (v - v_bar)``, whose energy is ``tr(G Cov_v)`` on
average). So per (layer, head) a symmetric weight ``A`` turns squared error in ``A x`` into output error, with
``A_v = G^(1/2)`` and ``A_k = (s^2 tr(G Cov_v) M)^(1/2)``: both kinds are then measured in the same unit, which is
what lets one budget be split between them by rate–distortion alone (``joint`` budgets). ``mse`` is the identity
(plain squared error, kvcal v1's metric), kept for ablations and for architectures without the needed hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcal.adapters import KVLayout, ModelAdapter
from kvcal.capture import QueryMoments

METRICS = ("attention", "mse")
# Eigenvalues of a weight below this fraction of its largest are raised to it, so its inverse (used to decode)
# stays finite; directions that weak carry no measurable output error at all.
_FLOOR = 1e-6


@dataclass(frozen=True)
class BlockWeights:
    """Per (layer, head) block of one PCA group, in group order: ``weight`` ``[blocks, d, d]`` (symmetric) and its
    inverse. A token row ``x`` (layers then heads then dims) is mapped to ``A x`` blockwise."""

    weight: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def identity(cls, blocks: int, d: int) -> BlockWeights:
        eye = torch.eye(d, dtype=torch.float64).expand(blocks, d, d).clone()
        return cls(eye, eye.clone())

    def apply_to_covariance(self, cov: torch.Tensor) -> torch.Tensor:
        """``A C A^T`` for the block-diagonal ``A``, without forming it: ``cov`` is ``[p, p]``."""
        b, d, _ = self.weight.shape
        c = cov.to(torch.float64).reshape(b, d, b, d)
        w = self.weight.to(c.device, torch.float64)
        out = torch.einsum("aij,ajbk,blk->aibl", w, c, w)
        return out.reshape(b * d, b * d)


def weighted_columns(blocks: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``Bd(blocks)^T @ columns`` for a block-diagonal ``Bd`` of ``[b, d, d]`` blocks, as float32 ``[p, r]``."""
    b, d, _ = blocks.shape
    r = columns.shape[1]
    cols = columns.to(torch.float64).reshape(b, d, r)
    return torch.einsum("aji,ajr->air", blocks.to(torch.float64), cols).reshape(b * d, r).float()


def symmetric_sqrt(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m^(1/2), m^(-1/2))`` of symmetric PSD matrices ``[..., d, d]``, with eigenvalues floored (see ``_FLOOR``)."""
    m = (m + m.transpose(-1, -2)).to(torch.float64) / 2
    evals, evecs = torch.linalg.eigh(m)
    top = evals.amax(dim=-1, keepdim=True).clamp_min(1e-300)
    evals = torch.maximum(evals, top * _FLOOR)
    root = evals.sqrt()
    sqrt = (evecs * root.unsqueeze(-2)) @ evecs.transpose(-1, -2)
    inv = (evecs / root.unsqueeze(-2)) @ evecs.transpose(-1, -2)
    return sqrt, inv


def output_gram(adapter: ModelAdapter, layer: int, layout: KVLayout) -> torch.Tensor:
    """``G`` per KV head, ``[kv_heads, d_v, d_v]``: the Gram of the ``o_proj`` columns of its query heads."""
    w = adapter.output_projection(layer).detach().to(torch.float64)  # [hidden, q_heads * d_v]
    dv, kv = layout.v_head_dim, layout.num_kv_heads
    q_heads = w.shape[1] // dv
    cols = w.reshape(w.shape[0], q_heads, dv).permute(1, 0, 2)  # [q_heads, hidden, d_v]
    grams = cols.transpose(1, 2) @ cols
    return grams.reshape(kv, q_heads // kv, dv, dv).sum(1).cpu()


def head_covariances(cov: torch.Tensor, blocks: int, d: int) -> torch.Tensor:
    """Diagonal ``[blocks, d, d]`` blocks of a group covariance ``[blocks * d, blocks * d]`` (on the host); given
    the blocks already (``StreamingMoments.head_covariances``), returns them."""
    if cov.dim() == 3:
        return cov.to("cpu", torch.float64)
    c = cov.to(torch.float64).reshape(blocks, d, blocks, d)
    idx = torch.arange(blocks, device=c.device)
    return c[idx, :, idx, :].cpu()


def fit_metric(
    metric: str,
    adapter: ModelAdapter,
    layout: KVLayout,
    layers: tuple[int, ...],
    value_cov: torch.Tensor,
    queries: QueryMoments | None,
) -> dict[str, BlockWeights]:
    """Block weights for keys (``"k"``) and values (``"v"``) of one PCA group spanning ``layers``."""
    heads = layout.num_kv_heads
    blocks = len(layers) * heads
    if metric == "mse":
        return {"k": BlockWeights.identity(blocks, layout.head_dim), "v": BlockWeights.identity(blocks, layout.v_head_dim)}
    if metric != "attention":
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if queries is None:
        raise ValueError("the attention-aware metric needs the query moments captured at calibration")
    cov_v = head_covariances(value_cov, blocks, layout.v_head_dim).reshape(len(layers), heads, layout.v_head_dim, -1)
    key_m, val_m = [], []
    for i, layer in enumerate(layers):
        gram = output_gram(adapter, layer, layout)  # [heads, dv, dv]
        spread = torch.einsum("hij,hji->h", gram, cov_v[i])  # tr(G Cov_v) per head
        scale = adapter.attention_scale(layer) ** 2
        m = queries.second_moment(layer).cpu()
        key_m.append(m * (scale * spread)[:, None, None])
        val_m.append(gram)
    k_sqrt, k_inv = symmetric_sqrt(torch.cat(key_m))
    v_sqrt, v_inv = symmetric_sqrt(torch.cat(val_m))
    return {"k": BlockWeights(k_sqrt, k_inv), "v": BlockWeights(v_sqrt, v_inv)}
