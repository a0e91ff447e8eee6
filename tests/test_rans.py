"""kvcal's own rANS (``kvcal.codec.rans``, the default entropy stage): exact round trips at every shape, frequency
tables that sum to 2^24 and keep every code, a rate within bytes of the symbol models' cross-entropy and of
constriction's coder, deterministic bytes, and hostile bytes refused in one line with bounded work."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fixtures import mutate_payload

from kvcal.codec import rans
from kvcal.codec.entropy import ENTROPY_STAGES, MAX_SPAN, SymbolModels, symbol_pmf
from kvcal.errors import BitstreamError

RANS = ENTROPY_STAGES["rans"]


def models_of(family, scale, span) -> SymbolModels:
    return SymbolModels(torch.tensor(family, dtype=torch.long), torch.tensor(scale, dtype=torch.float64),
                        torch.tensor(span, dtype=torch.long))


def sample_codes(models: SymbolModels, n: int, seed: int) -> np.ndarray:
    """``n`` tokens of codes drawn from each coordinate's own model (what calibrated data looks like)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, len(models)), dtype=np.int32)
    for j in range(len(models)):
        r = int(models.span[j])
        q = torch.arange(-r, r + 1)
        p = symbol_pmf(models.family[j], models.scale[j], q, models.span[j]).numpy()
        out[:, j] = rng.choice(2 * r + 1, size=n, p=p / p.sum()) - r
    return out


MIXED = models_of([0, 1, 0, 1, 0, 0], [0.2, 0.7, 3.0, 15.0, 400.0, 1.0], [3, 12, 40, 200, 4000, 0])


def test_tables_sum_to_the_precision_and_keep_every_code():
    t = MIXED.rans_tables
    assert len(t) == len(MIXED)
    for j, r in enumerate(MIXED.span.tolist()):
        cdf = t.cdf[t.cdf_offset[j] : t.cdf_offset[j + 1]].astype(np.int64)
        assert len(cdf) == 2 * r + 2 and cdf[0] == 0 and cdf[-1] == 1 << rans.PRECISION
        freq = np.diff(cdf)
        assert freq.min() >= 1  # a code calibration never saw still codes
        assert int(freq.argmax()) == r  # code 0 is the likeliest
        assert (freq == freq[::-1]).all() or freq[r] - freq[::-1][r] == 0  # symmetric families stay symmetric
        # Bucket b holds the symbol of slot b << (PRECISION - BUCKET_BITS): the decoder's search starts there.
        starts = np.arange(1 << rans.BUCKET_BITS) << (rans.PRECISION - rans.BUCKET_BITS)
        expect = np.searchsorted(cdf, starts, side="right") - 1
        assert (t.buckets[j, :-1] == expect).all() and t.buckets[j, -1] == 2 * r


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 64, 1001])
def test_round_trip_at_every_length(n):
    codes = sample_codes(MIXED, n, seed=n)
    payload = RANS.encode(codes, MIXED)
    assert len(payload) % 4 == 0 and len(payload) >= 4 * rans.STATE_WORDS
    assert np.array_equal(RANS.decode(payload, n, MIXED), codes)
    lo, hi = RANS.raw_size_bounds(n, len(MIXED), MIXED.min_token_bits)
    assert lo <= len(payload) <= hi


def test_every_code_of_the_span_round_trips_even_the_unlikeliest():
    models = models_of([0, 1], [0.1, 0.1], [MAX_SPAN, 5])
    codes = np.array([[MAX_SPAN, -5], [-MAX_SPAN, 5], [0, 0], [1, -1], [-MAX_SPAN + 1, 4]], dtype=np.int32)
    assert np.array_equal(RANS.decode(RANS.encode(codes, models), 5, models), codes)


def test_codes_outside_the_span_are_refused_by_the_encoder():
    models = models_of([0], [1.0], [3])
    with pytest.raises(ValueError, match="outside its symbol model's span"):
        RANS.encode(np.array([[4]], dtype=np.int32), models)


def test_rate_is_the_cross_entropy_and_matches_constriction():
    codes = sample_codes(MIXED, 4000, seed=1)
    payload = RANS.encode(codes, MIXED)
    symbols = (codes + MIXED.spans[None, :]).T
    table_bits = MIXED.rans_tables.cross_entropy_bits(np.ascontiguousarray(symbols))
    q = torch.from_numpy(codes.astype(np.int64))
    # The models renormalised over their spans (a truncated tail's mass goes to the codes inside; the allocator's
    # rate, which does not renormalise, is an upper bound)...
    mass = torch.stack([symbol_pmf(MIXED.family[j], MIXED.scale[j], torch.arange(-r, r + 1), MIXED.span[j]).sum()
                        for j, r in enumerate(MIXED.span.tolist())])
    model_bits = float(-torch.log2(symbol_pmf(MIXED.family, MIXED.scale, q, MIXED.span) / mass).sum())
    upper_bits = float(-torch.log2(symbol_pmf(MIXED.family, MIXED.scale, q, MIXED.span)).sum())
    # ...cost what the 24-bit tables do to 0.01%...
    assert abs(table_bits - model_bits) <= 1e-4 * model_bits and table_bits <= upper_bits
    # ...and the stream adds at most its four 64-bit states and a word per state for renormalisation slack.
    assert table_bits / 8 - 16 <= len(payload) <= table_bits / 8 + 8 * rans.STATE_WORDS
    # constriction refuses a one-code model (calibrated spans are >= 2), so it codes the other coordinates.
    wide = models_of(MIXED.family[:-1].tolist(), MIXED.scale[:-1].tolist(), MIXED.span[:-1].tolist())
    ours, ans = RANS.encode(codes[:, :-1], wide), ENTROPY_STAGES["ans"].encode(codes[:, :-1], wide)
    assert abs(len(ours) - len(ans)) <= 40, (len(ours), len(ans))


def test_bytes_are_deterministic_and_tables_rebuild_identically():
    codes = sample_codes(MIXED, 300, seed=2)
    again = models_of(MIXED.family.tolist(), MIXED.scale.tolist(), MIXED.span.tolist())
    assert RANS.encode(codes, MIXED) == RANS.encode(codes, again) == RANS.encode(codes.copy(), MIXED)
    a, b = MIXED.rans_tables, again.rans_tables
    assert np.array_equal(a.cdf, b.cdf) and np.array_equal(a.buckets, b.buckets)


def test_vectorised_tables_equal_one_coordinate_at_a_time():
    whole = MIXED.rans_tables
    for j in range(len(MIXED)):
        one = models_of([int(MIXED.family[j])], [float(MIXED.scale[j])], [int(MIXED.span[j])]).rans_tables
        assert np.array_equal(one.cdf, whole.cdf[whole.cdf_offset[j] : whole.cdf_offset[j + 1]])
        assert np.array_equal(one.buckets[0], whole.buckets[j])


def test_empty_sections():
    none = models_of([], [], [])
    assert RANS.encode(np.zeros((5, 0), np.int32), none) == b""
    assert RANS.decode(b"", 5, none).shape == (5, 0)
    with pytest.raises(BitstreamError, match="no codes are expected"):
        RANS.decode(b"\x00" * 32, 5, none)
    assert RANS.raw_size_bounds(0, 4) == (0, 0)


def test_short_and_ragged_payloads_are_refused():
    with pytest.raises(BitstreamError, match="shorter than its states or not whole 32-bit words"):
        RANS.decode(b"\x00" * 31, 4, MIXED)
    with pytest.raises(BitstreamError, match="shorter than its states or not whole 32-bit words"):
        RANS.decode(b"\x00" * 33, 4, MIXED)
    payload = RANS.encode(sample_codes(MIXED, 500, seed=3), MIXED)
    with pytest.raises(BitstreamError, match="ends before its codes do|does not decode cleanly"):
        RANS.decode(payload[:-8], 500, MIXED)
    with pytest.raises(BitstreamError, match="does not decode cleanly"):
        RANS.decode(payload + b"\x00" * 4, 500, MIXED)
    with pytest.raises(BitstreamError, match="ends before its codes do|does not decode cleanly"):
        RANS.decode(payload, 501, MIXED)  # a header claiming one token more


@pytest.mark.parametrize("seed", range(60))
def test_hostile_bytes_are_refused_or_decode_inside_the_spans(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    payload = bytearray(RANS.encode(sample_codes(MIXED, n, seed=seed), MIXED))
    payload = mutate_payload(rng, payload, seed % 5, state_bytes=4 * rans.STATE_WORDS)
    try:
        out = RANS.decode(bytes(payload), n, MIXED)
    except BitstreamError as err:
        assert "\n" not in str(err) and str(err).startswith("kvcal blob:")
        return
    assert out.shape == (n, len(MIXED)) and bool((np.abs(out) <= MIXED.spans[None, :]).all())


def test_all_ones_and_all_zeros_streams_do_not_run_away():
    """Extreme states (0 and 2^64 - 1) and words: one bounded step per symbol, then a refusal."""
    n = 2000
    for fill in (b"\x00", b"\xff"):
        with pytest.raises(BitstreamError):
            RANS.decode(fill * (4 * (rans.STATE_WORDS + 3)), n, MIXED)
    raw = np.frombuffer(RANS.encode(sample_codes(MIXED, n, seed=4), MIXED), dtype="<u4").copy()
    raw[: rans.STATE_WORDS] = 0xFFFFFFFF
    with pytest.raises(BitstreamError):
        RANS.decode(raw.tobytes(), n, MIXED)


def test_a_table_mismatch_is_refused_not_decoded_wrong():
    """If the decoder's tables ever differed from the encoder's (another platform's rounding), the stream leaves
    its path and the end-state check refuses it."""
    codes = sample_codes(MIXED, 2000, seed=5)
    payload = RANS.encode(codes, MIXED)
    shifted = models_of(MIXED.family.tolist(), [s * (1 + 1e-3) for s in MIXED.scale.tolist()], MIXED.span.tolist())
    assert not np.array_equal(shifted.rans_tables.cdf, MIXED.rans_tables.cdf)
    with pytest.raises(BitstreamError, match="does not decode cleanly|ends before"):
        RANS.decode(payload, 2000, shifted)


def test_min_token_bits_bound_admits_real_streams():
    """The size floor a header's token count implies (no token below ``min_token_bits``) never refuses a real one."""
    peaked = models_of([0] * 8, [0.05] * 8, [2] * 8)  # ~all zeros: the cheapest streams there are
    n = 5000
    codes = np.zeros((n, 8), dtype=np.int32)
    payload = RANS.encode(codes, peaked)
    lo, _ = RANS.raw_size_bounds(n, 8, peaked.min_token_bits)
    assert lo <= len(payload)
    assert math.isclose(len(payload) * 8, n * peaked.min_token_bits, rel_tol=0.5, abs_tol=8 * 4 * rans.STATE_WORDS)
