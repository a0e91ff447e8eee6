"""Per-token, per-group quantizers for PCA coordinates, and the bit packing of their codes.

The same functions run at calibration (``fake_quantize``, to measure the distortion each option would cause)
and at run time (``quantize`` / ``dequantize`` around the bitstream), so the distortion the bit allocator
optimises is exactly the one the codec produces. Everything is device-agnostic torch and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcal.errors import BitstreamError

# The position in this tuple is the type id written into artifacts: append only, never reorder.
QUANT_TYPES: tuple[str, ...] = ("none", "int2", "int4", "int8", "fp8")
PAYLOAD_BITS: dict[str, int] = {"none": 0, "int2": 2, "int4": 4, "int8": 8, "fp8": 8}
# Per group per token: integer types store an fp16 shift and an fp16 scale; fp8 is symmetric so only a scale.
META_BITS: dict[str, int] = {"none": 0, "int2": 32, "int4": 32, "int8": 32, "fp8": 16}

PACKABLE_BITS: tuple[int, ...] = (2, 4, 8)
FP16_MAX = 65504.0
FP8_E4M3_MAX = 448.0
_INT_BITS: dict[str, int] = {"int2": 2, "int4": 4, "int8": 8}


@dataclass(frozen=True)
class QuantGroup:
    """Coordinates ``[start, start + size)`` of every token, quantized together with type ``qtype``."""

    start: int
    size: int
    qtype: str


@dataclass
class QuantizedGroup:
    """One group for ``n`` tokens: ``codes`` uint8 [n, size] (one code per element, before bit packing),
    ``shift`` float16 [n] (zeros for fp8) and ``scale`` float16 [n]."""

    codes: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor


def check_qtype(qtype: str) -> None:
    if qtype not in PAYLOAD_BITS:
        raise ValueError(f"unknown quantization type {qtype!r}; expected one of {QUANT_TYPES}")


def group_cost_bits(qtype: str, size: int) -> int:
    """Bits one token spends on a group of ``size`` coordinates quantized as ``qtype`` (codes + metadata)."""
    check_qtype(qtype)
    if size < 1:
        raise ValueError(f"group size must be positive, got {size}")
    return size * PAYLOAD_BITS[qtype] + META_BITS[qtype]


def _sanitize_input(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected x of shape [tokens, group size], got {tuple(x.shape)}")
    # NaN/inf would make the row statistics NaN, and casting NaN to uint8 is undefined (CPU and CUDA
    # disagree); clamping to the fp16 range keeps the metadata finite and the codes reproducible.
    return torch.nan_to_num(x.float(), nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


def _fp16_step(h: torch.Tensor, direction: int) -> torch.Tensor:
    """The next fp16 above (direction +1) or below (-1) each value of ``h``.

    Done on the bit patterns rather than with ``torch.nextafter``, whose CUDA kernel lacks float16 before
    torch 2.6: fp16 is sign-magnitude, so mapping it to a signed integer order makes a step a +-1.
    """
    bits = h.view(torch.int16).to(torch.int32)
    magnitude = bits & 0x7FFF
    ordered = torch.where(bits < 0, -magnitude, magnitude) + direction
    stepped = torch.where(ordered < 0, -ordered - 0x8000, ordered)  # back to the int16 value of sign | magnitude
    return stepped.to(torch.int16).view(torch.float16)


def _fp16_round_down(v: torch.Tensor) -> torch.Tensor:
    """Largest finite fp16 <= v (v float32)."""
    h = v.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    h = torch.where(h.float() > v, _fp16_step(h, -1), h)
    return h.clamp(-FP16_MAX, FP16_MAX)


def _fp16_round_up(v: torch.Tensor) -> torch.Tensor:
    """Smallest finite fp16 >= v (v float32, non-negative)."""
    h = v.clamp(0.0, FP16_MAX).to(torch.float16)
    h = torch.where(h.float() < v, _fp16_step(h, 1), h)
    return h.clamp(0.0, FP16_MAX)


def _safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    # A zero scale means the row is constant (or all zero): every code is 0, so any non-zero divisor works
    # and we avoid 0/0 = NaN.
    s = scale.float()
    return torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)


def _quantize_int(x: torch.Tensor, bits: int) -> QuantizedGroup:
    qmax = (1 << bits) - 1
    lo, hi = torch.aminmax(x, dim=1)
    # The metadata is stored as fp16, so it is rounded before quantizing and the codes are computed against
    # the stored values: the decoder then reproduces exactly what the calibration measured. Rounding the
    # shift down and the scale up keeps [shift, shift + qmax * scale] covering the row, so no element is
    # clipped and the error stays within scale / 2.
    shift = _fp16_round_down(lo)
    scale = _fp16_round_up((hi - shift.float()) / qmax)
    codes = torch.round((x - shift.float().unsqueeze(1)) / _safe_divisor(scale)).clamp_(0, qmax)
    return QuantizedGroup(codes=codes.to(torch.uint8), shift=shift, scale=scale)


def _quantize_fp8(x: torch.Tensor) -> QuantizedGroup:
    absmax = x.abs().amax(dim=1)
    # Rounding the scale up keeps |x / scale| <= 448, the largest finite e4m3fn value, so nothing saturates.
    scale = _fp16_round_up(absmax / FP8_E4M3_MAX)
    scaled = (x / _safe_divisor(scale)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    # A real e4m3 cast (round to nearest even, subnormals included) rather than an emulation, so the codes
    # are the bytes any fp8 kernel would produce.
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    return QuantizedGroup(codes=codes, shift=torch.zeros_like(scale), scale=scale)


def quantize(x: torch.Tensor, qtype: str) -> QuantizedGroup:
    """Quantize ``x`` (float [n, size], one row per token) as ``qtype``, one shift/scale per row.

    ``"none"`` yields all-zero codes and metadata: the coordinates are pruned and decode to zero.
    """
    check_qtype(qtype)
    xf = _sanitize_input(x)
    n, size = xf.shape
    if qtype == "none":
        zeros = torch.zeros(n, dtype=torch.float16, device=xf.device)
        return QuantizedGroup(torch.zeros(n, size, dtype=torch.uint8, device=xf.device), zeros, zeros.clone())
    if qtype == "fp8":
        return _quantize_fp8(xf)
    return _quantize_int(xf, _INT_BITS[qtype])


def _finite_or_zero(v: torch.Tensor) -> torch.Tensor:
    # Metadata may come from a hostile or corrupted stream: a non-finite fp16 would poison the whole row.
    f = v.float()
    return torch.where(torch.isfinite(f), f, torch.zeros_like(f))


def _check_group_shapes(q: QuantizedGroup) -> None:
    if q.codes.dtype != torch.uint8 or q.codes.dim() != 2:
        raise BitstreamError(
            f"quantized codes must be uint8 [tokens, size], got {q.codes.dtype} {tuple(q.codes.shape)}"
        )
    n = q.codes.shape[0]
    if q.shift.shape != (n,) or q.scale.shape != (n,):
        raise BitstreamError(
            f"quantized group metadata does not match its {n} tokens: "
            f"shift {tuple(q.shift.shape)}, scale {tuple(q.scale.shape)}"
        )


def dequantize(q: QuantizedGroup, qtype: str) -> torch.Tensor:
    """Reconstruct float32 [n, size]; always finite, whatever bytes ``q`` holds."""
    check_qtype(qtype)
    _check_group_shapes(q)
    if qtype == "none":
        return torch.zeros(q.codes.shape, dtype=torch.float32, device=q.codes.device)
    scale = _finite_or_zero(q.scale).unsqueeze(1)
    if qtype == "fp8":
        # e4m3fn has no infinities but 0x7F/0xFF are NaN; a stream never produced by quantize() may hold them.
        values = torch.nan_to_num(q.codes.view(torch.float8_e4m3fn).float(), nan=0.0)
        return values * scale
    # Any byte times a finite fp16 scale plus a finite fp16 shift stays far inside the float32 range.
    return q.codes.float() * scale + _finite_or_zero(q.shift).unsqueeze(1)


def fake_quantize(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """What the decoder will reconstruct for ``x``: float32, same shape; zeros for ``"none"``."""
    check_qtype(qtype)
    if qtype == "none":
        if x.dim() != 2:
            raise ValueError(f"expected x of shape [tokens, group size], got {tuple(x.shape)}")
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return dequantize(quantize(x, qtype), qtype)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can only pack {PACKABLE_BITS}-bit codes, got {bits}")


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy once packed (the last byte zero-padded)."""
    _check_bits(bits)
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (any shape, read in row-major order) into a flat uint8 tensor, ``8 // bits`` per byte.

    Code ``i`` lands in byte ``i * bits // 8`` at bit offset ``i * bits % 8`` counted from the least significant
    bit (little-endian bit order), so the layout does not depend on the host or device.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.clone()
    per_byte = 8 // bits
    pad = -flat.numel() % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # Masking makes an out-of-range code corrupt only itself, never its neighbours in the same byte.
    lanes = (flat & ((1 << bits) - 1)).view(-1, per_byte)
    packed = lanes[:, 0].clone()
    for lane in range(1, per_byte):
        packed |= lanes[:, lane] << (lane * bits)
    return packed


def unpack_codes(buf: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: a flat uint8 tensor of ``count`` codes.

    Raises ``BitstreamError`` unless ``buf`` is a flat uint8 tensor of exactly ``packed_size(count, bits)`` bytes.
    """
    _check_bits(bits)
    if count < 0:
        raise BitstreamError(f"negative code count {count}")
    expected = packed_size(count, bits)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != expected:
        raise BitstreamError(
            f"packed codes hold {buf.numel()} bytes ({buf.dtype}, shape {tuple(buf.shape)}); "
            f"{count} codes of {bits} bits need exactly {expected} uint8 bytes"
        )
    if bits == 8:
        return buf.clone()
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    lanes = [(buf >> (lane * bits)) & mask for lane in range(per_byte)]
    return torch.stack(lanes, dim=1).reshape(-1)[:count].contiguous()
