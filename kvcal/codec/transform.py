"""The transform: cache tensors -> position-free token rows -> PCA coordinates, and back.

Keys are un-rotated at their true positions by the model's adapter; the layers of a PCA group are concatenated
per token (layers, then heads, then dims), centred, and mapped by the artifact's encoder (metric weights, then
the basis columns the ratio keeps). Decoding multiplies by the decoder (the exact inverse on those columns),
adds the mean and re-applies RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcal.adapters import KVLayout, ModelAdapter
from kvcal.codec.geometry import CacheGeometry
from kvcal.codec.rope_rows import (
    fused_layer_path,
    gather_centred_rows,
    rotate_rows,
    scatter_rotated_rows,
    unrotate_rows,
)
from kvcal.fit.metric import weighted_columns


@dataclass(frozen=True)
class Projection:
    """One PCA group's map between token rows ``[n, p]`` and kept coordinates ``[n, k]``."""

    mean: torch.Tensor  # [p]
    encoder: torch.Tensor  # [p, k]
    decoder: torch.Tensor  # [k, p]
    layer_slices: dict[int, slice]  # columns of each layer in a row

    def to(self, device) -> Projection:
        if self.mean.device == torch.device(device):
            return self
        return Projection(self.mean.to(device), self.encoder.to(device), self.decoder.to(device), self.layer_slices)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        return self.project_centred(rows.float() - self.mean)

    def project_centred(self, centred: torch.Tensor) -> torch.Tensor:
        """Rows with the mean already subtracted (``centred_middle_rows``) -> kept coordinates."""
        return centred @ self.encoder

    def reconstruct_layer(self, coords: torch.Tensor, layer: int, heads: int, head_dim: int) -> torch.Tensor:
        """One layer's slice of the decoded rows, ``[n, heads, head_dim]`` (keys still position-free)."""
        sl = self.layer_slices[layer]
        x = coords @ self.decoder[:, sl] + self.mean[sl]
        return x.reshape(coords.shape[0], heads, head_dim)


def projection_for(artifact, kind: str, g: int, columns: torch.Tensor) -> Projection:
    """The encoder/decoder of PCA group ``g`` restricted to basis ``columns`` (indices), from the artifact."""
    basis = artifact.basis(kind, g).double()[:, columns]
    weight, inverse = artifact.metric_weights(kind, g)
    layout = artifact.layout
    return Projection(artifact.mean(kind, g).float(), weighted_columns(weight, basis),
                      weighted_columns(inverse, basis).T.contiguous(),
                      layer_slices(layout, kind, artifact.groups[g]))


def head_dim(layout: KVLayout, kind: str) -> int:
    return layout.head_dim if kind == "k" else layout.v_head_dim


def layer_slices(layout: KVLayout, kind: str, layers: tuple[int, ...]) -> dict[int, slice]:
    width = layout.num_kv_heads * head_dim(layout, kind)
    return {layer: slice(i * width, (i + 1) * width) for i, layer in enumerate(layers)}


def middle_rows(kv, geo: CacheGeometry, adapter: ModelAdapter, kind: str, layers: tuple[int, ...],
                rotary_dim: int | None = None) -> torch.Tensor:
    """Middle tokens of every batch item as rows ``[N, p]``, position-free, float32, item-major.

    ``rotary_dim`` as for ``scatter_middle``: the group's rows are gathered as cached, then un-rotated in one pass
    (``kvcal.codec.rope_rows``: the adapter's own expression, the same bits); None: layer by layer via
    ``position_free``.
    """
    first = kv[layers[0]][0 if kind == "k" else 1]
    heads, d = first.shape[1], first.shape[3]
    rows = torch.empty(geo.middle_tokens, len(layers) * heads * d, dtype=torch.float32, device=first.device)
    row = 0
    for item in range(geo.batch):
        lo, hi = geo.middle(item)
        if hi <= lo:
            continue
        positions = geo.positions(item, lo, hi, first.device)  # one tensor: the adapter reuses its RoPE factors
        block = rows[row : row + hi - lo].view(hi - lo, len(layers) * heads, d)
        raw = torch.empty_like(block) if rotary_dim else block
        for i, layer in enumerate(layers):
            t = kv[layer][0 if kind == "k" else 1][item, :, lo:hi]
            if rotary_dim is None:
                t = adapter.position_free(kind, t[None], layer, positions)[0]
            # Straight into the row block (tokens, heads x dims): one copy instead of a reshape and a concatenation.
            raw[:, i * heads : (i + 1) * heads].copy_(t.permute(1, 0, 2))
        if rotary_dim:
            cos, sin = adapter.cos_sin(layers[0], positions)
            unrotate_rows(block, raw, cos[0].to(block.device), sin[0].to(block.device))
        row += hi - lo
    return rows


def centred_middle_rows(kv, geo: CacheGeometry, adapter: ModelAdapter, kind: str, layers: tuple[int, ...],
                        rotary_dim: int | None, mean: torch.Tensor) -> tuple[torch.Tensor, bool | None]:
    """``middle_rows(...) - mean`` (the same bits), and whether every middle value read was finite.

    Where every layer of the group is a contiguous CPU tensor (``rope_rows.fused_layer_path``) and ``rotary_dim``
    is not None, one compiled pass gathers, un-rotates, centres and checks finiteness
    (``rope_rows.gather_centred_rows``); else ``middle_rows`` then a subtraction, and the finiteness is None (not
    checked: the caller checks the cache).
    """
    tensors = [kv[layer][0 if kind == "k" else 1] for layer in layers]
    if rotary_dim is None or not all(fused_layer_path(t) for t in tensors) or mean.device.type != "cpu":
        rows = middle_rows(kv, geo, adapter, kind, layers, rotary_dim)
        return rows.sub_(mean), None
    heads, d = tensors[0].shape[1], tensors[0].shape[3]
    rows = torch.empty(geo.middle_tokens, len(layers) * heads * d, dtype=torch.float32)
    finite = True
    row = 0
    for item in range(geo.batch):
        lo, hi = geo.middle(item)
        if hi <= lo:
            continue
        cos, sin = _span_cos_sin(adapter, layers[0], geo.first_position(item, lo), hi - lo, rotary_dim, "cpu")
        finite &= gather_centred_rows(rows[row : row + hi - lo], [t[item] for t in tensors], lo, cos, sin, mean)
        row += hi - lo
    return rows, finite


def _span_cos_sin(adapter: ModelAdapter, layer: int, start: int, n: int, rotary_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE factors ``[n, rotary_dim]`` of ``n`` positions from ``start`` for the fused kernels (``[n, 0]``: no RoPE)."""
    if not rotary_dim:
        empty = torch.zeros(n, 0, device=device)
        return empty, empty
    cos, sin = adapter.cos_sin_span(layer, start, n, device)
    return cos.contiguous(), sin.contiguous()


def scatter_middle(kv, geo: CacheGeometry, adapter: ModelAdapter, kind: str, layers: tuple[int, ...],
                   projection: Projection, coords: torch.Tensor, layout: KVLayout, rotary_dim: int | None = None) -> None:
    """Decode ``coords`` (rows as ``middle_rows`` made them) into the middle of ``kv``'s tensors, in place.

    ``rotary_dim`` (``KVTCCodec.group_rotary_dim``): when every layer of the group is plain half-split RoPE from
    one table (0: no RoPE), the whole group is re-positioned in one pass over its contiguous decoded rows, with
    the same float32 expression as the adapter's (``kvcal.codec.rope_rows``), so the same bits; None: layer by
    layer through ``adapter.at_positions``.
    """
    heads, d = layout.num_kv_heads, head_dim(layout, kind)
    # Every layer of the group in one matmul: a column slice of the decoder per layer is a strided operand and
    # as many small calls (measured: about 2x the time of the one product). The mean rides in it (addmm): a
    # separate addition would be one more pass over every decoded row.
    decoded = torch.addmm(projection.mean, coords, projection.decoder)
    targets = [kv[layer][0 if kind == "k" else 1] for layer in layers]
    fused = rotary_dim is not None and decoded.device.type == "cpu" and all(fused_layer_path(t) for t in targets)
    row = 0
    for item in range(geo.batch):
        lo, hi = geo.middle(item)
        if hi <= lo:
            continue
        block = decoded[row : row + hi - lo]
        positions = None if fused else geo.positions(item, lo, hi, coords.device)
        if fused:  # one compiled pass over the group's rows, straight into the cache tensors (``rope_rows``)
            cos, sin = _span_cos_sin(adapter, layers[0], geo.first_position(item, lo), hi - lo, rotary_dim, "cpu")
            scatter_rotated_rows([target[item] for target in targets], lo, block, cos, sin)
        elif rotary_dim is not None:
            rows = block.view(hi - lo, len(layers) * heads, d)
            if rotary_dim:
                cos, sin = adapter.cos_sin(layers[0], positions)
                rows = rotate_rows(torch.empty_like(rows), rows, cos[0].to(rows.device), sin[0].to(rows.device))
            for i, layer in enumerate(layers):
                target = kv[layer][0 if kind == "k" else 1]
                target[item, :, lo:hi] = rows[:, i * heads : (i + 1) * heads].permute(1, 0, 2)
        else:
            for layer in layers:
                t = block[:, projection.layer_slices[layer]].reshape(hi - lo, heads, d).permute(1, 0, 2)[None]
                t = adapter.at_positions(kind, t, layer, positions)
                target = kv[layer][0 if kind == "k" else 1]
                target[item, :, lo:hi] = t[0].to(target.dtype)
        row += hi - lo
