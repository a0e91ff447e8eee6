"""The codec's compiled CPU paths against the torch expressions they replace: the same bits, the same refusals."""

import numpy as np
import pytest
import torch
from test_codec import prefill

import kvcal
from kvcal.codec.bitstream import read_blob, read_blob_lazily, write_blob
from kvcal.codec.entropy import SymbolModels
from kvcal.codec.exact import gather_exact, scatter_exact
from kvcal.codec.geometry import CacheGeometry, host_all_finite
from kvcal.codec.quantize import CoordinateQuantizer
from kvcal.codec.transform import centred_middle_rows, middle_rows
from kvcal.errors import BitstreamError, KvcalError


def test_compiled_quantize_and_dequantize_match_torch():
    """Halves round to even, NaN goes to 0, +-inf and the far tails clip to the span, exactly as torch does."""
    k = 6
    step = torch.tensor([0.5, 0.25, 1.0, 2.0, 0.1, 3.0])
    models = SymbolModels(torch.zeros(k, dtype=torch.long), torch.ones(k), torch.tensor([3, 10, 100, 2, 32767, 5]))
    q = CoordinateQuantizer(torch.arange(k), step, models)
    coords = torch.randn(3000, k, generator=torch.Generator().manual_seed(0)) * 30
    coords[0] = torch.tensor([0.25, 0.125, 0.5, 1.0, 0.05, 4.5])  # exact halves of a step
    coords[1] = torch.tensor([float("inf"), -float("inf"), float("nan"), -3.0, -0.15, 7.5])
    coords[2] = torch.tensor([-0.75, 0.375, 2.5, -5.0, 3276.75, -7.5])
    compiled = q.quantize(coords)
    by_torch = q.quantize(coords.t().contiguous().t())  # not contiguous: torch's expression
    assert compiled.dtype == by_torch.dtype == torch.int32
    assert torch.equal(compiled, by_torch)
    assert compiled[0].tolist() == [0, 0, 0, 0, 0, 2] and compiled[1].tolist() == [3, -10, 0, -2, -2, 2]
    codes = torch.randint(-100, 101, (500, k), dtype=torch.int32)
    assert torch.equal(q.dequantize(codes, "cpu"), codes.float() * step)


def _kv(cache, dtype=torch.float32):
    return [(layer.keys.to(dtype).clone(), layer.values.to(dtype).clone()) for layer in cache.layers]


def test_fused_gather_gives_the_centred_rows_bit_for_bit(calibrated):
    """One pass per group (gather, un-rotate, centre, check finiteness) against ``middle_rows`` then a subtraction,
    with left padding and position offsets; a NaN in a middle key is reported, one in the sinks is not its job."""
    model_dir = calibrated("llama")
    mask = torch.ones(2, 90, dtype=torch.long)
    mask[1, :13] = 0
    model, cache = prefill(model_dir, n=90, mask=mask)
    codec = kvcal.load(model_dir, ratio=4, model=model)
    kv = _kv(cache)
    geo = codec.geometry(kv, mask, (0,) * len(kv), [0, 29])
    for kind in ("k", "v"):
        rot, mean = codec.group_rotary_dim(kind, 0), codec.placed(kind, 0, "cpu")[0].mean
        fused, finite = centred_middle_rows(kv, geo, codec.adapter, kind, codec.groups[0], rot, mean)
        assert finite is True
        assert torch.equal(fused, middle_rows(kv, geo, codec.adapter, kind, codec.groups[0], rot) - mean)
    lo = geo.middle(1)[0]
    kv[codec.groups[0][-1]][0][1, 1, lo + 5, 0] = float("nan")
    rows, finite = centred_middle_rows(kv, geo, codec.adapter, "k", codec.groups[0], codec.group_rotary_dim("k", 0),
                                       codec.placed("k", 0, "cpu")[0].mean)
    assert finite is False
    # Half-precision caches are widened in the kernels, to the bits middle_rows gives.
    mean = codec.placed("k", 0, "cpu")[0].mean
    rot = codec.group_rotary_dim("k", 0)
    half = _kv(cache, torch.bfloat16)
    rows, finite = centred_middle_rows(half, geo, codec.adapter, "k", codec.groups[0], rot, mean)
    assert finite is True and torch.equal(rows, middle_rows(half, geo, codec.adapter, "k", codec.groups[0], rot) - mean)
    half = _kv(cache, torch.float16)
    rows, finite = centred_middle_rows(half, geo, codec.adapter, "k", codec.groups[0], rot, mean)
    assert finite is True and torch.equal(rows, middle_rows(half, geo, codec.adapter, "k", codec.groups[0], rot) - mean)
    # Not the kernels' job (a non-contiguous cache): middle_rows, and finiteness left to the caller.
    strided = [(k.transpose(2, 3).contiguous().transpose(2, 3), v) for k, v in _kv(cache)]
    rows, finite = centred_middle_rows(strided, geo, codec.adapter, "k", codec.groups[0], rot, mean)
    assert finite is None


@pytest.mark.parametrize("where", ["middle_key", "sink", "left_padding", "exact_window_inf"])
def test_non_finite_values_are_refused_wherever_they_sit(calibrated, where):
    """The CPU path checks middle values as it gathers them and the exact tokens in one pass; padding (never
    stored) is still checked, as the whole cache always was."""
    model_dir = calibrated("llama")
    mask = torch.ones(2, 120, dtype=torch.long)
    mask[1, :9] = 0
    model, cache = prefill(model_dir, n=120, mask=mask)
    kv = _kv(cache)
    codec = kvcal.load(model_dir, ratio=4, model=model)
    layer = codec.layout.coded_layers[-1]
    item, token, value = {"middle_key": (0, 60, float("nan")), "sink": (1, 10, float("nan")),
                          "left_padding": (1, 3, float("nan")), "exact_window_inf": (0, 119, -float("inf"))}[where]
    kv[layer][0][item, 0, token, 1] = value
    with pytest.raises(KvcalError, match=f"layer {layer} of the cache holds NaN or inf"):
        codec.compress(kv, attention_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_layout_round_trips_with_padding(calibrated, dtype):
    """``gather_exact`` (numpy on integer views) gives torch.cat's bytes; ``scatter_exact`` puts them back and
    zeroes the left padding."""
    model_dir = calibrated("gemma2")  # sliding layers: exact whole, beside coded ones
    codec = kvcal.load(model_dir, ratio=4)
    L = codec.layout
    gen = torch.Generator().manual_seed(1)
    n = 70
    kv = [(torch.randn(2, L.num_kv_heads, n, L.head_dim, generator=gen).to(dtype),
           torch.randn(2, L.num_kv_heads, n, L.v_head_dim, generator=gen).to(dtype)) for _ in range(L.num_layers)]
    geo = CacheGeometry(2, n, "float32", (n,) * L.num_layers, (0,) * L.num_layers, (0, 11), (0, 0), 4, 16)
    flat = gather_exact(kv, geo, L)
    parts = []
    for layer, pair in enumerate(kv):
        for t in pair:
            if layer in L.exact_layers:
                parts.append(t.reshape(-1))
                continue
            for item in range(2):
                lo, hi = geo.middle(item)
                parts += [t[item, :, geo.pads[item] : lo].reshape(-1), t[item, :, hi:].reshape(-1)]
    assert torch.equal(flat.view(torch.uint8), torch.cat(parts).view(torch.uint8))
    assert host_all_finite(flat)
    out = [(torch.full_like(k, 7), torch.full_like(v, 7)) for k, v in kv]
    scatter_exact(out, flat, geo, L)
    for layer, ((k, v), (k2, v2)) in enumerate(zip(kv, out)):
        for a, b in ((k, k2), (v, v2)):
            if layer in L.exact_layers:
                assert torch.equal(a, b)
                continue
            assert torch.equal(b[1, :, :11], torch.zeros_like(b[1, :, :11]))  # padding zeroed
            for item in range(2):
                lo, hi = geo.middle(item)
                assert torch.equal(a[item, :, geo.pads[item] : lo], b[item, :, geo.pads[item] : lo])
                assert torch.equal(a[item, :, hi:], b[item, :, hi:])
                assert bool((b[item, :, lo:hi] == 7).all())  # the middle is the coded sections' to write
    flat[3] = float("inf")
    assert not host_all_finite(flat)
    assert host_all_finite(flat[:0])


def test_lazy_sections_decode_on_lookup_and_refuse_the_same_bytes():
    raw = np.arange(5000, dtype=np.int32).tobytes()
    blob = write_blob({"n": 1}, [("a", raw), ("b", b"plain bytes")], compress=[True, False])
    header, lazy = read_blob_lazily(blob)
    assert header == {"n": 1} and list(lazy) == ["a", "b"] and len(lazy) == 2
    assert lazy["b"] == b"plain bytes" and lazy["a"] == raw
    assert read_blob(blob) == (header, {"a": raw, "b": b"plain bytes"})
    # A zstd frame whose content is damaged, with a recomputed CRC: the CRC passes, the section fails at lookup.
    import struct
    import zlib

    spot = blob.index(b"plain bytes") - 10
    forged = bytearray(blob)
    forged[spot] ^= 0xFF
    forged[-4:] = struct.pack("<I", zlib.crc32(bytes(forged[:-4])))
    _, lazy = read_blob_lazily(bytes(forged))
    assert lazy["b"] == b"plain bytes"
    with pytest.raises(BitstreamError):
        lazy["a"]
    with pytest.raises(BitstreamError):
        read_blob(bytes(forged))


def test_cos_sin_span_is_the_gathered_table(calibrated):
    model_dir = calibrated("qwen3")
    adapter = kvcal.load(model_dir, ratio=4).adapter
    for start, n in ((0, 1), (5, 300), (4000, 700)):  # the last grows the table past its first size
        cos, sin = adapter.cos_sin(0, torch.arange(start, start + n)[None])
        span_cos, span_sin = adapter.cos_sin_span(0, start, n, "cpu")
        assert torch.equal(span_cos, cos[0]) and torch.equal(span_sin, sin[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rot", [0, 32, 64])
def test_fused_kernels_match_the_adapter_expressions(rot, dtype):
    """Partial rotary too (``rot < d``): the kernels against ``unrotate_into`` / ``rotate_into``, bit for bit, and
    half-precision caches widened on the way in and rounded (to nearest even, as torch) on the way out."""
    from kvcal.adapters.base import rotate_into, unrotate_into
    from kvcal.codec.rope_rows import gather_centred_rows, scatter_rotated_rows

    gen = torch.Generator().manual_seed(rot)
    heads, tokens, d, layers, lo, n = 2, 50, 64, 3, 7, 30
    srcs = [(torch.randn(heads, tokens, d, generator=gen) * 3).to(dtype) for _ in range(layers)]
    angle = torch.rand(n, rot // 2, generator=gen) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1).contiguous(), torch.cat([angle.sin()] * 2, -1).contiguous()
    mean = torch.randn(layers * heads * d, generator=gen)
    out = torch.empty(n, layers * heads * d)
    assert gather_centred_rows(out, srcs, lo, cos, sin, mean)
    raw = torch.stack([s[:, lo : lo + n].float() for s in srcs], 0).permute(2, 0, 1, 3).reshape(n, layers * heads, d)
    want = raw.clone()
    if rot:
        unrotate_into(want[..., :rot], raw[..., :rot].clone(), cos[:, None], sin[:, None],
                      (cos * cos + sin * sin)[:, None])
    assert torch.equal(out, want.reshape(n, -1) - mean)

    dsts = [torch.zeros(heads, tokens, d, dtype=dtype) for _ in range(layers)]
    scatter_rotated_rows(dsts, lo, out, cos, sin)
    rows = out.view(n, layers * heads, d)
    back = rotate_into(torch.empty_like(rows), rows, cos[:, None], sin[:, None]) if rot else rows
    for i, dst in enumerate(dsts):
        assert torch.equal(dst[:, lo : lo + n], back[:, i * heads : (i + 1) * heads].permute(1, 0, 2).to(dtype))
        assert bool((dst[:, :lo] == 0).all()) and bool((dst[:, lo + n :] == 0).all())
    srcs[1][0, lo + 3, d - 1] = float("nan")
    assert not gather_centred_rows(out, srcs, lo, cos, sin, mean)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_widen_and_narrow_half_precision_as_torch_converts(dtype):
    """Every one of the 65,536 bit patterns widens to torch's float32 (NaN stays NaN); float32 values across the
    format's range (subnormals, the rounding edges to inf, halfway cases) narrow to torch's bits."""
    from kvcal.codec.rope_rows import gather_centred_rows, scatter_rotated_rows

    src = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, 1024, 64)
    out, none = torch.empty(1024, 64), torch.zeros(1024, 0)
    assert not gather_centred_rows(out, [src], 0, none, none, torch.zeros(64))  # it holds inf and NaN
    want = src[0].float()
    nan = torch.isnan(want)
    assert torch.equal(out.view(torch.int32)[~nan], want.view(torch.int32)[~nan]) and bool(torch.isnan(out[nan]).all())

    gen = torch.Generator().manual_seed(0)
    scale = torch.exp2(torch.randint(-30, 20, (60000,), generator=gen).float())
    values = torch.cat([torch.randn(60000, generator=gen) * scale, (torch.arange(-35000, 35000) * 2.0**-10),
                        torch.tensor([65504.0, 65519.99, 65520.0, 1e10, 2.98e-8, 2.9802322e-08, 5.96e-8, 1e-9, -0.0,
                                      float("inf"), -float("inf")])])
    rows = values[: values.numel() // 64 * 64].reshape(-1, 64).contiguous()
    dst = torch.zeros(1, rows.shape[0], 64, dtype=dtype)
    none = torch.zeros(rows.shape[0], 0)
    scatter_rotated_rows([dst], 0, rows, none, none)
    assert torch.equal(dst[0].view(torch.int16), rows.to(dtype).view(torch.int16))


def test_concurrent_calls_give_the_sequential_bytes(calibrated):
    """Serving stacks call one codec from many threads (LMCache's serde pool): the section pool is shared, so
    concurrent compressions and decompressions must give exactly what one thread gives."""
    from concurrent.futures import ThreadPoolExecutor

    model_dir = calibrated("llama")
    model, cache = prefill(model_dir, n=150, batch=1)
    codec = kvcal.load(model_dir, ratio=4, model=model)
    caches = [[(k * (1 + i / 8), v - i / 16) for k, v in _kv(cache, dtype)]
              for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32] * 2)]
    blobs = [codec.compress(kv) for kv in caches]
    decoded = [codec.decompress(blob) for blob in blobs]

    def round_trip(i):
        blob = codec.compress(caches[i])
        return blob, codec.decompress(blobs[i])

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(round_trip, range(len(caches))))
    for (blob, out), want_blob, want in zip(results, blobs, decoded):
        assert blob == want_blob
        for a, b in zip(out.layers, want.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
