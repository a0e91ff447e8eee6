"""A pure-torch PORT of LMCache 0.5.6's two TurboQuant Triton kernels, for running its serde without CUDA.

LMCache's TurboQuant serde (``lmcache.v1.distributed.serde.turboquant``) refuses to run without CUDA, and its
Triton kernels under ``TRITON_INTERPRET=1`` run at ~0.03 MB/s. This module re-implements, in vectorised torch on
the CPU, exactly what those two kernels compute, so the bench can run LMCache's own serializer code with only the
kernel bodies swapped:

- ``turboquant_store`` stands for ``store_kernel.triton_turboquant_store`` (the launcher: key norm + rotation in
  torch as the launcher does it, then the fused store kernels ``_tq_fused_store_mse`` / ``_tq_fused_store_fp8``:
  bucketize by binary search over the Lloyd-Max midpoints, 3/4-bit index packing, fp16 norm, 3/4-bit value
  quantization with fp16 scale and zero);
- ``FullDequant`` stands for ``decode_kernel._tq_full_dequant_kv`` (unpack, centroid lookup, optional norm
  correction, scale by the fp16 norm; values unpacked and de-scaled; fp16 out).

It is a port (same arithmetic, same byte layout), checked byte for byte against the interpreted Triton kernels by
``tests/test_lmcache_serde.py`` (in an environment with ``kvcal[lmcache]`` and ``triton``). ``patched_turboquant``
swaps the port in for LMCache's kernels and its CUDA device selection. The FP8 key path casts with torch's
``float8_e4m3fn`` after saturating to its finite range, as Triton's ``float8e4nv`` cast does on Hopper.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

FP8_MAX = 448.0


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[n]`` -> little-endian fp16 bytes ``[n, 2]``."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _from_fp16_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 2]`` -> float32 ``[n]`` (fp16 little-endian)."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int ``[n, D]`` codes of ``bits`` (3 or 4) -> packed bytes, as the kernels pack them (little-endian)."""
    n, d = codes.shape
    c = codes.to(torch.int64)
    if bits == 4:
        pairs = c.reshape(n, d // 2, 2) & 0xF
        return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    groups = (c & 0x7).reshape(n, d // 8, 8)
    packed = (groups << (torch.arange(8) * 3)).sum(-1)  # 24 bits per group of 8
    return torch.stack([(packed >> s) & 0xFF for s in (0, 8, 16)], dim=-1).reshape(n, -1).to(torch.uint8)


def _unpack(raw: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Packed bytes ``[n, >= ceil(d * bits / 8) + 1]`` -> int codes ``[n, d]`` (reads two bytes per code, like the kernel)."""
    off = torch.arange(d) * bits
    byte, shift = off // 8, off % 8
    lo = raw[:, byte].to(torch.int32)
    hi = raw[:, byte + 1].to(torch.int32)
    return ((lo | (hi << 8)) >> shift) & ((1 << bits) - 1)


def _quantize_values(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``_store_quantized_value``: float32 ``[n, D]`` -> packed codes + fp16 scale + fp16 zero, ``[n, bytes]``."""
    levels = float((1 << bits) - 1)
    vmin = v.min(dim=1).values
    vmax = v.max(dim=1).values
    scale = (vmax - vmin) / levels
    scale = torch.where(scale > 1e-8, scale, torch.full_like(scale, 1e-8))
    q = ((v - vmin[:, None]) / scale[:, None] + 0.5).to(torch.int32).clamp(0, int(levels))
    return torch.cat([_pack(q, bits), _fp16_bytes(scale), _fp16_bytes(vmin)], dim=1)


def turboquant_store(key, value, kv_cache, slot_mapping, PiT, midpoints, mse_bits, key_packed_size,  # noqa: N803
                     value_quant_bits, key_fp8=False):
    """Port of ``triton_turboquant_store``: writes each token-head's slot of ``kv_cache`` ``[blocks, block, H, slot]``."""
    n, h, d = key.shape
    block_size = kv_cache.shape[1]
    if key_fp8:
        k_bytes = key.reshape(n * h, d).float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        k_flat = key.float().reshape(n * h, d)
        norms = k_flat.norm(dim=1, keepdim=True)
        y = (k_flat / (norms + 1e-8)) @ PiT
        idx = torch.searchsorted(midpoints.contiguous(), y.contiguous(), right=True).clamp(max=2**mse_bits - 1)
        k_bytes = torch.cat([_pack(idx, mse_bits), _fp16_bytes(norms.squeeze(1))], dim=1)
    v_bytes = _quantize_values(value.float().reshape(n * h, d), value_quant_bits)
    slot_bytes = torch.cat([k_bytes, v_bytes], dim=1)  # [n * h, key_packed_size + value bytes]
    assert slot_bytes.shape[1] == key_packed_size + math.ceil(d * value_quant_bits / 8) + 4
    slots = slot_mapping.to(torch.long)
    keep = slots >= 0
    flat = kv_cache.view(-1, h, kv_cache.shape[-1])  # [blocks * block_size, H, slot]
    assert flat.shape[0] == kv_cache.shape[0] * block_size
    flat[slots[keep], :, : slot_bytes.shape[1]] = slot_bytes.reshape(n, h, -1)[keep]


class FullDequant:
    """Port of ``_tq_full_dequant_kv``, called as the serde calls the kernel: ``FullDequant()[grid](...)``."""

    def __getitem__(self, grid):
        return self.run

    @staticmethod
    def run(kv_cache, block_table, centroids, k_out, v_out, *strides, HEAD_DIM, BLOCK_SIZE, NUM_KV_HEADS,  # noqa: N803
            MSE_BYTES, KPS, VQB, VAL_DATA_BYTES, MSE_BITS, KEY_FP8, BLOCK_D, NORM_CORRECTION=0, FP8_E4B15=0,
            num_warps=4, **_):
        d, h = HEAD_DIM, NUM_KV_HEADS
        blocks = block_table[0].to(torch.long)
        pages = kv_cache[blocks]  # [blocks, block_size, H, slot] in logical order
        slots = pages.reshape(-1, h, pages.shape[-1])  # [alloc_len, H, slot]
        n = slots.shape[0]
        # The kernel reads one byte past a packed field (masked by the shift); pad so the last code can too.
        flat = torch.cat([slots.reshape(n * h, -1), torch.zeros(n * h, 1, dtype=torch.uint8)], dim=1)
        if KEY_FP8:
            if FP8_E4B15:
                raise NotImplementedError("the port implements the e4nv (Hopper) FP8 path only")
            k = flat[:, :d].contiguous().view(torch.float8_e4m3fn).float()
        else:
            idx = _unpack(flat, MSE_BITS, d).to(torch.long)
            k = centroids[idx]
            if NORM_CORRECTION:
                k = k * (1.0 / torch.sqrt((k * k).sum(1, keepdim=True) + 1e-16))
            k = _from_fp16_bytes(flat[:, MSE_BYTES : MSE_BYTES + 2])[:, None] * k
        vals = flat[:, KPS:]
        if VQB in (3, 4):
            codes = _unpack(vals, VQB, d).to(torch.float32)
            scale = _from_fp16_bytes(vals[:, VAL_DATA_BYTES : VAL_DATA_BYTES + 2])[:, None]
            zero = _from_fp16_bytes(vals[:, VAL_DATA_BYTES + 2 : VAL_DATA_BYTES + 4])[:, None]
            v = codes * scale + zero
        else:
            v = torch.zeros(n * h, d)
        k_out[0, :, :n] = k.reshape(n, h, d).transpose(0, 1).to(torch.float16)
        v_out[0, :, :n] = v.reshape(n, h, d).transpose(0, 1).to(torch.float16)


@contextmanager
def patched_turboquant():
    """Run LMCache's TurboQuant serializer/deserializer on the CPU with this port in place of its Triton kernels.

    Patched for the duration: the CUDA device selection (returns the CPU), ``store_kernel.triton_turboquant_store``,
    ``decode_kernel._tq_full_dequant_kv`` and ``decode_kernel._use_fp8_e4b15`` (0: the e4nv FP8 format).
    Everything else — layout, layer skipping, Lloyd-Max tables, WHT rotation, the key un-rotation after decode —
    is LMCache's own code.
    """
    import sys
    import types

    from lmcache.v1.distributed.serde.turboquant import turboquant as tq

    saved_modules = {}
    fake = {}
    # The kernel modules import triton at import time; when it is absent, stand-ins carry the port.
    for name in ("store_kernel", "decode_kernel"):
        full = f"lmcache.v1.distributed.serde.turboquant.{name}"
        try:
            __import__(full)
        except ImportError:
            saved_modules[full] = sys.modules.get(full)
            fake[full] = sys.modules[full] = types.ModuleType(full)
    store = sys.modules["lmcache.v1.distributed.serde.turboquant.store_kernel"]
    decode = sys.modules["lmcache.v1.distributed.serde.turboquant.decode_kernel"]
    patches = [(tq, "_select_cuda_device", lambda *a, **k: torch.device("cpu")),
               (store, "triton_turboquant_store", turboquant_store),
               (decode, "_tq_full_dequant_kv", FullDequant()),
               (decode, "_use_fp8_e4b15", lambda device=0: 0)]
    missing = object()
    old = [(obj, name, getattr(obj, name, missing)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in old:
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
        for full, module in saved_modules.items():
            if module is None:
                sys.modules.pop(full, None)
            else:
                sys.modules[full] = module
