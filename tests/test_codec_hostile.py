"""Hostile and edge-case blobs through the KVTC codec: a seeded slice of ``scripts/fuzz_codec.py``, short caches,
forged headers behind a valid CRC, format v1, payload edits, and re-compression without drift."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

import kvcal
from kvcal.codec.bitstream import FORMAT_VERSION, MAGIC
from kvcal.errors import BitstreamError

ROOT = Path(__file__).resolve().parents[1]
PREFIX = struct.Struct("<8sHI")  # magic, format version, header_len: kvcal.codec.bitstream's layout


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_codec", ROOT / "scripts" / "fuzz_codec.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_codec", module)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def split(blob: bytes) -> tuple[int, dict, bytes]:
    """``(version, header with its section table, payload)`` of a blob."""
    _, version, header_len = PREFIX.unpack_from(blob)
    return version, json.loads(blob[PREFIX.size : PREFIX.size + header_len]), blob[PREFIX.size + header_len : -4]


def forge(blob: bytes, version: int | None = None, drop: tuple[str, ...] = (), **changes) -> bytes:
    """``blob`` with header fields changed (or dropped), re-signed: canonical JSON and a CRC32 of every byte before it."""
    old_version, header, payload = split(blob)
    header.update(changes)
    for key in drop:
        header.pop(key)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = PREFIX.pack(MAGIC, old_version if version is None else version, len(text)) + text + payload
    return body + struct.pack("<I", zlib.crc32(body))


def refused(codec, blob: bytes, match: str) -> str:
    with pytest.raises(BitstreamError, match=match) as err:
        codec.decompress(blob)
    message = str(err.value)
    assert message.strip() and "\n" not in message, message
    return message


def kv_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (ka, va), (kb, vb) in zip(a, b, strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.fixture(scope="module")
def setup(llama):
    """Codecs of both entropy stages, real caches and their blobs (the fuzzer's bases)."""
    model_dir, model, _ = llama
    codecs = {entropy: kvcal.load(model_dir, ratio=4, model=model, entropy=entropy) for entropy in ("rans", "ans", "zstd")}
    shapes = [s for s in fuzz.CACHE_SHAPES if s[0] in ("n5b1", "n37b1", "n80b2pad", "n48b1f16", "n120b1")]
    caches = fuzz.real_caches(str(model_dir), shapes)
    specs = [fuzz.CodecSpec("llama", str(model_dir), entropy, 4.0) for entropy in codecs]
    by_key = {spec.key: codecs[spec.entropy] for spec in specs}
    bases, twice = fuzz.compress_bases(specs, {"llama": caches}, by_key)
    return {"codecs": codecs, "by_key": by_key, "caches": {c["name"]: c for c in caches}, "bases": bases,
            "twice": twice, "model": model}


def blob_of(setup, name: str, entropy: str = "rans") -> bytes:
    return next(b.blob for b in setup["bases"] if b.name == f"llama/{entropy}@4/{name}")


# ---------------------------------------------------------------------------------------------------------------
# The fuzzer's invariant on a seeded slice


def test_seeded_fuzz_slice(setup):
    bases, by_key = setup["bases"], setup["by_key"]
    keys = sorted(by_key)
    outcomes: dict[str, int] = {}
    for index in range(300):
        case = fuzz.make_case(index, 0, bases, keys)
        outcome, detail, seconds = fuzz.check_decode(by_key[case.codec], case.data, must_refuse=case.foreign)
        assert outcome in fuzz.OK_OUTCOMES, (index, case.kind, case.base, case.desc, outcome, detail)
        assert seconds < 2.0, (index, case.kind, case.desc, seconds)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("decoded", 0) > 10 and outcomes.get("refused", 0) > 150, outcomes
    # Blob i is a pure function of (i, seed, bases): a failure replays from its index.
    assert fuzz.make_case(123, 0, bases, keys).data == fuzz.make_case(123, 0, bases, keys).data
    assert fuzz.make_case(123, 0, bases, keys).data != fuzz.make_case(123, 1, bases, keys).data


def test_intact_blobs_decode_and_pass_the_invariant(setup):
    for base in setup["bases"]:
        assert fuzz.check_decode(setup["by_key"][base.codec], base.blob)[0] == "decoded", base.name


# ---------------------------------------------------------------------------------------------------------------
# Short caches


@pytest.mark.parametrize("entropy", ["rans", "ans", "zstd"])
def test_every_short_length_round_trips(setup, entropy):
    codec = setup["codecs"][entropy]
    sink, window = codec.sink, codec.window
    assert (sink, window) == (4, 32)  # TINY_CAL's window; the recipe's default sink
    full = kv_of(setup["caches"]["n120b1"]["cache"])
    for n in range(1, sink + window + 2):
        kv = [(k[:, :, :n].contiguous(), v[:, :, :n].contiguous()) for k, v in full]
        restored = kv_of(codec.decompress(codec.compress(kv)))
        for (k, v), (rk, rv) in zip(kv, restored, strict=True):
            assert rk.shape == k.shape and rv.shape == v.shape and rk.dtype == k.dtype
            if n <= sink + window:  # no middle: the whole cache is stored exactly
                assert torch.equal(k, rk) and torch.equal(v, rv), n
            else:
                for x, y in ((k, rk), (v, rv)):
                    assert torch.equal(x[:, :, :sink], y[:, :, :sink]) and torch.equal(x[:, :, -window:], y[:, :, -window:])
                    assert torch.isfinite(y).all()
        assert codec.stats(codec.compress(kv))["middle_tokens"] == max(0, n - sink - window)


def test_short_left_padded_batch(setup):
    codec = setup["codecs"]["rans"]
    full = kv_of(setup["caches"]["n120b1"]["cache"])
    kv = [(torch.cat([k[:, :, :20], k[:, :, 20:40]]), torch.cat([v[:, :, :20], v[:, :, 20:40]])) for k, v in full]
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :15] = 0  # item 1: five real tokens, fewer than sink + window
    restored = kv_of(codec.decompress(codec.compress(kv, attention_mask=mask)))
    for (k, v), (rk, rv) in zip(kv, restored, strict=True):
        assert torch.equal(k[0], rk[0]) and torch.equal(v[0], rv[0])
        assert torch.equal(k[1, :, 15:], rk[1, :, 15:]) and not rk[1, :, :15].any()


# ---------------------------------------------------------------------------------------------------------------
# Forged headers with a recomputed CRC


def test_forged_sink_and_window_are_refused(setup):
    codec = setup["codecs"]["rans"]
    short = blob_of(setup, "n5b1")
    assert split(short)[1]["seq_len"] == 5
    refused(codec, forge(short, sink=6), "keeps sink 6 and window 32 exact, this codec 4 and 32")
    refused(codec, forge(short, window=31), "keeps sink 4 and window 31")
    refused(codec, forge(short, sink=0, window=0), "keeps sink 0 and window 0")
    long = blob_of(setup, "n120b1")
    refused(codec, forge(long, sink=5, window=31), "load the codec with sink=5, window=31")


def test_codec_with_other_sink_or_window_refuses(setup, llama):
    model_dir, model, _ = llama
    blob = blob_of(setup, "n37b1")
    for sink, window in ((2, 32), (4, 16), (6, 32)):
        other = kvcal.load(model_dir, ratio=4, model=model, sink=sink, window=window)
        refused(other, blob, f"this codec {sink} and {window}; load the codec with sink=4, window=32")


def test_forged_geometry_is_refused(setup):
    codec = setup["codecs"]["rans"]
    blob = blob_of(setup, "n37b1")
    refused(codec, forge(blob, seq_len=38), "full-attention layer must hold seq_len tokens")
    refused(codec, forge(blob, layer_lens=[37, 36]), "full-attention layer must hold seq_len tokens")
    # Consistent among themselves, not with the payload: the section sizes or the ANS stream give it away.
    refused(codec, forge(blob_of(setup, "n5b1"), seq_len=6, layer_lens=[6, 6]), "'exact' declares 2560 raw bytes, but its header implies 3072")
    refused(codec, forge(blob, seq_len=38, layer_lens=[38, 38]), "rANS section (does not decode cleanly|ends before)")
    refused(codec, forge(blob, seq_len=36, layer_lens=[36, 36]), "sections do not match its header")
    refused(codec, forge(blob, layer_lens=[37]), "'layer_lens' must have 2 to 2 items")
    refused(codec, forge(blob, batch=2), "'pads' must have 2 to 2 items")
    refused(codec, forge(blob, pads=[37]), "'pads' must hold 1 integers in \\[0, 36\\]")
    refused(codec, forge(blob, sliding=[0, 8]), "full-attention layer must hold seq_len tokens, unwindowed")
    refused(codec, forge(blob, seq_len=True), "'seq_len' must be an integer")
    refused(codec, forge(blob, dtype="float64"), "'dtype' must be one of")


def test_forged_huge_geometry_is_refused_before_any_allocation(setup):
    """A few KB claiming 64 x 2^20 tokens: the rANS sections are far too short for that many tokens."""
    codec = setup["codecs"]["rans"]
    blob = blob_of(setup, "n120b1")
    _, header, _ = split(blob)
    n, b = 1 << 20, 64
    exact = {**fuzz.Base.from_blob("x", "rans", blob).sections}
    exact["exact"] = exact["exact"] * b
    forged = fuzz.Base.from_blob("x", "rans", blob).rewrite(
        {**{k: v for k, v in header.items() if k != "sections"}, "seq_len": n, "layer_lens": [n, n], "batch": b,
         "pads": [0] * b, "offsets": [0] * b}, exact)
    refused(codec, forged, "section 'k0' declares .* raw bytes, but its header implies")
    refused(codec, forge(blob, seq_len=n, layer_lens=[n, n]), "but its header implies")


def test_forged_identity_fields_are_refused(setup):
    codec = setup["codecs"]["rans"]
    blob = blob_of(setup, "n37b1")
    refused(codec, forge(blob, model_type="mistral"), "cache of a 'mistral' model, this codec is for 'llama'")
    refused(codec, forge(blob, ratio="8"), "coded at ratio 8, this codec is ratio 4")
    refused(codec, forge(blob, ratio=4), "coded at ratio 4, this codec is ratio 4")  # a number, not the key "4"
    refused(codec, forge(blob, entropy="zstd"), "entropy-coded with 'zstd', this codec uses 'rans'")
    refused(codec, forge(blob, entropy="ans"), "entropy-coded with 'ans', this codec uses 'rans'")
    refused(codec, forge(blob, artifact_id="0" * 32), "coded with another artifact")
    refused(codec, forge(blob, kind="kvcal-kvtc-v1"), "not a kvcal KVTC blob")
    refused(codec, forge(blob, note="hello"), "unknown field\\(s\\) 'note'")
    refused(codec, forge(blob, drop=("offsets",)), "lacks field\\(s\\) 'offsets'")
    refused(setup["codecs"]["zstd"], blob, "entropy-coded with 'rans', this codec uses 'zstd'")
    refused(setup["codecs"]["ans"], blob, "entropy-coded with 'rans', this codec uses 'ans'")


def test_format_version_1_and_newer_are_named(setup):
    codec = setup["codecs"]["rans"]
    blob = blob_of(setup, "n37b1")
    message = refused(codec, forge(blob, version=1), "format version 1 ")
    assert "kvcal 0.1" in message
    refused(codec, forge(blob, version=FORMAT_VERSION + 1), f"format version {FORMAT_VERSION + 1}, .*upgrade kvcal")
    refused(codec, forge(blob, version=0), "unknown format version 0")


# ---------------------------------------------------------------------------------------------------------------
# Payload edits with a recomputed CRC


@pytest.mark.parametrize("entropy", ["rans", "ans", "zstd"])
def test_payload_edits_are_refused_or_decode_finite(setup, entropy):
    import random

    bases = [b for b in setup["bases"] if b.codec.startswith(f"llama/{entropy}@")]
    codec = setup["codecs"][entropy]
    rng = random.Random(11)
    counts = {"refused": 0, "decoded": 0}
    for _ in range(60):
        base = rng.choice(bases)
        mutator = rng.choice((fuzz.payload_crc, fuzz.section_edit))
        data, desc = mutator(rng, base, bases)
        outcome, detail, _ = fuzz.check_decode(codec, bytes(data))
        assert outcome in fuzz.OK_OUTCOMES, (base.name, desc, outcome, detail)
        counts[outcome] += 1
    assert counts["refused"] and counts["decoded"], counts


def test_exact_tokens_holding_nan_are_refused(setup):
    base = next(b for b in setup["bases"] if b.name == "llama/rans@4/n37b1")
    sections = dict(base.sections)
    sections["exact"] = struct.pack("<f", float("nan")) + sections["exact"][4:]
    refused(setup["codecs"]["rans"], base.rewrite(base.fields, sections), "exact tokens hold NaN or inf")


# ---------------------------------------------------------------------------------------------------------------
# Determinism and re-compression


@pytest.mark.parametrize("entropy", ["rans", "ans", "zstd"])
def test_recompression_does_not_drift(setup, entropy):
    codec = setup["codecs"][entropy]
    for name in ("n120b1", "n80b2pad"):
        c = setup["caches"][name]
        blobs, decoded = [codec.compress(c["cache"], attention_mask=c["mask"])], []
        for _ in range(10):
            decoded.append(kv_of(codec.decompress(blobs[-1])))
            blobs.append(codec.compress(decoded[-1], attention_mask=c["mask"]))
        assert all(b == blobs[1] for b in blobs[1:]), name
        for generation in decoded[1:]:
            assert_same(generation, decoded[1])


def test_same_cache_compressed_twice_gives_identical_bytes(setup):
    assert setup["twice"] and all(setup["twice"].values()), setup["twice"]
    c = setup["caches"]["n80b2pad"]
    for codec in setup["codecs"].values():
        assert codec.compress(c["cache"], attention_mask=c["mask"]) == codec.compress(c["kv"], attention_mask=c["mask"])


def test_sliding_layer_cannot_claim_more_tokens_than_its_window_keeps(calibrated):
    """A DynamicSlidingWindowLayer keeps window - 1 tokens: a header claiming more would decode short, so it is refused."""
    model_dir = calibrated("gemma2")
    caches = fuzz.real_caches(str(model_dir), [("n40b1", 40, 1, 0, 0, "float32")])
    codec = kvcal.load(model_dir, ratio=4)
    blob = codec.compress(caches[0]["cache"])
    _, header, _ = split(blob)
    exact_layers = codec.layout.exact_layers
    assert exact_layers and all(header["sliding"][i] > 40 for i in exact_layers)
    assert fuzz.check_decode(codec, blob)[0] == "decoded"
    for window in (2, 3, 40):
        sliding = [window if i in exact_layers else 0 for i in range(len(header["sliding"]))]
        refused(codec, forge(blob, sliding=sliding), f"holds 40 tokens, but its sliding window of {window} keeps at most {window - 1}")
    sliding = [41 if i in exact_layers else 0 for i in range(len(header["sliding"]))]
    assert fuzz.check_decode(codec, forge(blob, sliding=sliding))[0] == "decoded"


def test_a_cache_too_large_to_allocate_is_a_one_line_refusal(setup, monkeypatch):
    """A zstd section of zeros can declare a million tokens in kilobytes; the header's limits allow it, so the
    decoder may meet an allocator that says no. That is a BitstreamError naming the size, not a RuntimeError."""
    import kvcal.codec.kvtc as kvtc_module

    codec = setup["codecs"]["zstd"]
    blob = blob_of(setup, "n120b1", "zstd")
    real_empty = torch.empty

    def refusing_empty(*shape, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3221225472 bytes.")

    monkeypatch.setattr(kvtc_module.torch, "empty", refusing_empty)
    try:
        message = refused(codec, blob, r"declares a 0\.\d\d GiB cache, which cannot be allocated on cpu")
    finally:
        monkeypatch.setattr(kvtc_module.torch, "empty", real_empty)
    assert "DefaultCPUAllocator" in message
    assert_same(kv_of(codec.decompress(blob)), kv_of(codec.decompress(blob)))  # and the normal path is untouched
