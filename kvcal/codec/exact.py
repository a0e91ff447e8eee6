"""The exact tokens: what a blob stores verbatim (sinks, the recent window, and every layer the codec leaves exact).

Blob order: layer by layer, keys then values; an exact layer whole (all batch items), a coded layer per batch item
as its sinks (after the left padding) then its window. ``gather_exact`` and ``scatter_exact`` are the two
directions of that one layout.

On the CPU both move bytes with numpy on same-width integer views of the tensors: single-threaded, so they run
beside the codec's entropy workers without torch's intra-op threads waiting on a core a worker holds (measured:
torch's ``cat`` and slice copies took 2-6x longer there than alone). Off the CPU, torch does it on the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvcal.adapters import KVLayout
from kvcal.codec.geometry import HOST_BITS, CacheGeometry, host_bits


def _parts(kv, geo: CacheGeometry, layout: KVLayout):
    """The exact slices of ``kv`` in blob order."""
    for layer, pair in enumerate(kv):
        for t in pair:
            if layer in layout.exact_layers:
                yield t
                continue
            for item in range(geo.batch):
                lo, hi = geo.middle(item)
                yield t[item, :, geo.pads[item] : lo]
                yield t[item, :, hi:]


def gather_exact(kv, geo: CacheGeometry, layout: KVLayout) -> torch.Tensor:
    """The exact tokens of a cache in blob order, flat, in its dtype and on its device."""
    parts = list(_parts(kv, geo, layout))
    dtype, device = kv[0][0].dtype, kv[0][0].device
    if device.type != "cpu" or dtype not in HOST_BITS:
        return torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0, dtype=dtype, device=device)
    out = torch.empty(sum(p.numel() for p in parts), dtype=dtype)
    flat, pos = host_bits(out), 0
    for p in parts:
        np.copyto(flat[pos : pos + p.numel()].reshape(p.shape), host_bits(p))
        pos += p.numel()
    return out


def scatter_exact(kv, exact: torch.Tensor, geo: CacheGeometry, layout: KVLayout) -> None:
    """Write flat exact tokens (``gather_exact``'s layout, on ``kv``'s device) into ``kv``, zeroing left padding."""
    host = exact.device.type == "cpu" and exact.dtype in HOST_BITS
    flat = host_bits(exact) if host else exact
    pos = 0
    for layer, pair in enumerate(kv):
        for t in pair:
            if layer in layout.exact_layers:
                slots = [t]
            else:
                slots = []
                for item in range(geo.batch):
                    lo, hi = geo.middle(item)
                    (host_bits(t)[item, :, : geo.pads[item]] if host else t[item, :, : geo.pads[item]])[...] = 0
                    slots += [t[item, :, geo.pads[item] : lo], t[item, :, hi:]]
            for slot in slots:
                count = math.prod(slot.shape)
                src = flat[pos : pos + count].reshape(tuple(slot.shape))
                if host:
                    np.copyto(host_bits(slot), src)
                else:
                    slot.copy_(src)
                pos += count
