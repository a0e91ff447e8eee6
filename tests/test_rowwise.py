"""Quantizers and code packing: error bounds, exactness, genuine e4m3, and robustness to hostile bytes."""

from __future__ import annotations

import pytest
import torch

from kvcal.codec.rowwise import (
    FP16_MAX,
    META_BITS,
    PAYLOAD_BITS,
    QUANT_TYPES,
    QuantizedGroup,
    dequantize,
    fake_quantize,
    group_cost_bits,
    pack_codes,
    packed_size,
    quantize,
    unpack_codes,
)
from kvcal.codec.rowwise import _fp16_step as fp16_step
from kvcal.errors import BitstreamError

INT_TYPES = {"int2": 2, "int4": 4, "int8": 8}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # These tensors are tiny: intra-op threads only add synchronisation cost (milliseconds per call on a busy
    # machine). Restored afterwards so other test modules keep their settings.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sample_rows(seed: int = 0, n: int = 64, size: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Rows with very different magnitudes and offsets exercise the per-row shift/scale.
    magnitude = torch.logspace(-3, 3, n).unsqueeze(1)
    offset = torch.randn(n, 1, generator=gen) * magnitude
    return torch.randn(n, size, generator=gen) * magnitude + offset


def test_type_table_and_costs() -> None:
    assert QUANT_TYPES == ("none", "int2", "int4", "int8", "fp8")
    assert group_cost_bits("none", 64) == 0
    assert group_cost_bits("int4", 16) == 16 * 4 + 32
    assert group_cost_bits("fp8", 16) == 16 * 8 + 16
    assert all(group_cost_bits(t, 3) == 3 * PAYLOAD_BITS[t] + META_BITS[t] for t in QUANT_TYPES)
    with pytest.raises(ValueError):
        group_cost_bits("int3", 4)


@pytest.mark.parametrize("qtype", sorted(INT_TYPES))
def test_int_error_within_half_step(qtype: str) -> None:
    x = sample_rows()
    q = quantize(x, qtype)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == x.shape
    assert q.shift.dtype == torch.float16 and q.scale.dtype == torch.float16
    assert int(q.codes.max()) <= 2 ** INT_TYPES[qtype] - 1
    error = (dequantize(q, qtype) - x).abs()
    bound = q.scale.float().unsqueeze(1) / 2 * (1 + 1e-5) + 1e-6 * x.abs()
    assert bool((error <= bound).all())


@pytest.mark.parametrize("qtype", sorted(INT_TYPES))
def test_int_metadata_is_what_dequantize_uses(qtype: str) -> None:
    x = sample_rows(seed=1)
    q = quantize(x, qtype)
    expected = q.codes.float() * q.scale.float().unsqueeze(1) + q.shift.float().unsqueeze(1)
    assert torch.equal(dequantize(q, qtype), expected)
    assert torch.equal(fake_quantize(x, qtype), expected)


def test_fp8_error_within_e4m3_precision() -> None:
    x = sample_rows(seed=2)
    q = quantize(x, "fp8")
    assert torch.equal(q.shift, torch.zeros_like(q.shift))
    scale = q.scale.float().unsqueeze(1)
    # 3 mantissa bits: relative rounding error 2^-4 for normals; subnormal spacing is 2^-9 of the scale.
    bound = 2.0**-4 * x.abs() * (1 + 1e-5) + scale * 2.0**-10
    assert bool(((dequantize(q, "fp8") - x).abs() <= bound).all())


def test_fp8_codes_are_genuine_e4m3_bytes() -> None:
    x = torch.tensor([[448.0, 1.0, 0.5, -1.0, 0.0]])
    q = quantize(x, "fp8")
    assert float(q.scale[0]) == 1.0
    expected = torch.tensor([448.0, 1.0, 0.5, -1.0, 0.0]).to(torch.float8_e4m3fn).view(torch.uint8)
    assert q.codes[0].tolist() == expected.tolist() == [126, 56, 48, 184, 0]
    y = sample_rows(seed=3)
    assert not torch.equal(fake_quantize(y, "fp8"), fake_quantize(y, "int8"))


@pytest.mark.parametrize("qtype", sorted(INT_TYPES))
def test_constant_rows_are_exact(qtype: str) -> None:
    values = torch.tensor([0.0, 1.5, -3.25, 1024.0, -0.0078125])  # representable in fp16
    x = values.unsqueeze(1).expand(-1, 8).contiguous()
    q = quantize(x, qtype)
    assert torch.equal(q.scale, torch.zeros_like(q.scale))
    assert torch.equal(fake_quantize(x, qtype), x)


def test_fp8_zero_and_power_of_two_rows_are_exact() -> None:
    # fp8 has no shift, so a constant row is exact only when absmax / 448 is itself an fp16 (e.g. 0 or 448 * 2^k).
    x = torch.tensor([[0.0] * 4, [448.0] * 4, [-3.5] * 4, [112.0, -0.4375, 56.0, 0.0]])
    assert torch.equal(fake_quantize(x, "fp8"), x)


def test_none_decodes_to_zeros() -> None:
    x = sample_rows(seed=4, n=3, size=5)
    assert torch.equal(fake_quantize(x, "none"), torch.zeros(3, 5))
    assert torch.equal(dequantize(quantize(x, "none"), "none"), torch.zeros(3, 5))


def test_non_finite_input_gives_finite_reproducible_output() -> None:
    x = torch.tensor([[float("nan"), 1.0, float("inf"), -2.0], [1e30, -1e30, 0.0, 3.0]])
    for qtype in QUANT_TYPES:
        out = fake_quantize(x, qtype)
        assert torch.isfinite(out).all()
        assert torch.equal(out, fake_quantize(x, qtype))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 13, 64])
def test_pack_round_trip(bits: int, count: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + count)
    codes = torch.randint(0, 2**bits, (count,), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits) == (count * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_pack_bit_order_is_little_endian() -> None:
    assert pack_codes(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b00000011]
    assert pack_codes(torch.tensor([[0xA, 0x5, 0xF]], dtype=torch.uint8), 4).tolist() == [0x5A, 0x0F]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_rejects_wrong_length(bits: int) -> None:
    packed = pack_codes(torch.zeros(10, dtype=torch.uint8), bits)
    with pytest.raises(BitstreamError):
        unpack_codes(packed[:-1], bits, 10)
    with pytest.raises(BitstreamError):
        unpack_codes(torch.cat([packed, packed[:1]]), bits, 10)
    with pytest.raises(BitstreamError):
        unpack_codes(packed, bits, -1)


def test_dequantize_hostile_bytes_and_metadata_is_finite() -> None:
    gen = torch.Generator().manual_seed(5)
    n, size = 32, 16
    codes = torch.randint(0, 256, (n, size), generator=gen, dtype=torch.uint8)
    codes[0, :4] = torch.tensor([0x7F, 0xFF, 0x7E, 0xFE], dtype=torch.uint8)  # e4m3fn NaNs and +-448
    raw = torch.randint(0, 2**16, (2, n), generator=gen, dtype=torch.int32).to(torch.int16)
    shift, scale = raw.view(torch.float16)
    shift[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 65504.0])
    scale[:4] = torch.tensor([float("inf"), float("nan"), 65504.0, -float("inf")])
    for qtype in QUANT_TYPES:
        out = dequantize(QuantizedGroup(codes, shift, scale), qtype)
        assert out.shape == (n, size) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_dequantize_rejects_mismatched_metadata() -> None:
    q = quantize(sample_rows(n=4), "int4")
    with pytest.raises(BitstreamError):
        dequantize(QuantizedGroup(q.codes, q.shift[:3], q.scale), "int4")


def test_fp16_step_matches_nextafter_on_every_finite_half() -> None:
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = every[torch.isfinite(every) & (every.float().abs() < FP16_MAX)]
    for direction, target in ((1, float("inf")), (-1, -float("inf"))):
        expected = torch.nextafter(finite, torch.full_like(finite, target))  # float16 nextafter exists on CPU
        # Compared as values: stepping up from the smallest negative subnormal gives +0 here, -0 in nextafter.
        assert torch.equal(fp16_step(finite, direction), expected)
