"""kvcal's own rANS coder: four interleaved 64-bit states, 32-bit words, 24-bit probabilities, compiled by numba.

Why not ``constriction`` (the ``ans`` stage): its categorical decoder costs ~35 ns a symbol, which made the
entropy stage the largest part of a v2 decompression, and it holds the GIL. This coder spends the same bits
(probabilities quantized to the same 24-bit precision: its rate is the symbol models' cross-entropy, plus 32 bytes
of states a section) and decodes at 5-8 ns a symbol on this project's 2-core CPU, without the GIL, so sections
decode on worker threads while others are reconstructed. A bucket table indexed by the slot's top ``BUCKET_BITS``
bits narrows the CDF search to the one or two symbols that share the bucket (a binary search over at most the
whole alphabet when many share it); four states in flight keep the CPU's pipelines busy, and the refill is
branch-free (a predictor loses that coin toss every few symbols).

Stream layout (little-endian ``uint32`` words): the four final states, low word first, then the renormalisation
words in the order the decoder reads them. Symbol ``i`` of a coordinate (token order) uses state ``i mod 4``;
coordinates follow one another in the artifact's order. Both states and words come from ryg's ``rans64``
construction (state in ``[2^31, 2^63)``), encoded backwards so that the decoder reads forwards.

Frequencies come from ``kvcal.fit.symbols.symbol_pmf``, the formula the calibration's rate measurements use:
``f = floor(p * (2^24 - A)) + 1`` for each of the ``A`` symbols (so every code in the span stays codable), the
remainder given to code 0, the likeliest code of every (zero-centred, unimodal) family. If an encoder's and a
decoder's tables ever disagreed (another platform's libm rounding a probability across an integer), the states
would leave their path at the first symbol affected and the stream would not end where the encoder started,
which the decoder refuses.

Hostile bytes: the decoder does one bounded step per symbol (at most one word read, at most ``log2 A`` probes,
every index in range by construction), stops at the end of the words, and reports whether the stream ended
exactly at the encoder's initial state with every word consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

PRECISION = 24  # probability bits, as constriction's default coder: every symbol keeps >= 2^-24
LANES = 4  # interleaved states (the decoder is unrolled for exactly four)
BUCKET_BITS = 10  # slot -> symbol bucket table: 1025 int32 per coordinate (10 and 12 measured alike; 10 is smaller)
_SHIFT = PRECISION - BUCKET_BITS
_TOTAL = 1 << PRECISION
_STATE_LOW = 1 << 31  # the state lives in [2^31, 2^63); encoding starts (and decoding must end) at 2^31
STATE_WORDS = 2 * LANES

# Return codes of the compiled kernels.
OK, SYMBOL_OUT_OF_RANGE, OUTPUT_FULL, TOO_SHORT, RAN_OUT, UNCLEAN_END = 0, -1, -2, -3, -4, -5


@dataclass(frozen=True)
class RansTables:
    """Quantized CDFs and bucket tables of ``k`` coordinates' symbol models, flat, in coding order."""

    cdf: np.ndarray  # int32: coordinate j's A_j + 1 cumulative frequencies (0 .. 2^24) at cdf_offset[j]
    cdf_offset: np.ndarray  # int64 [k + 1]
    buckets: np.ndarray  # int32 [k, 2^BUCKET_BITS + 1]: symbol holding slot b << _SHIFT (last: slot 2^24 - 1)

    def __len__(self) -> int:
        return len(self.cdf_offset) - 1

    @classmethod
    def from_models(cls, family: torch.Tensor, scale: torch.Tensor, span: torch.Tensor) -> RansTables:
        """Vectorised over coordinates: one ``symbol_pmf`` call for every symbol of every coordinate."""
        from kvcal.fit.symbols import symbol_pmf

        span_np = span.to(torch.int64).numpy()
        k = len(span_np)
        alphabet = 2 * span_np + 1
        if k == 0:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros((0, (1 << BUCKET_BITS) + 1), np.int32))
        if int(alphabet.max()) > _TOTAL // 2:
            raise ValueError(f"a symbol model spans {int(alphabet.max())} codes, more than rANS at {PRECISION} bits codes")
        seg = np.zeros(k + 1, np.int64)
        np.cumsum(alphabet, out=seg[1:])
        coord = np.repeat(np.arange(k), alphabet)
        q = np.arange(seg[-1]) - seg[coord] - span_np[coord]
        idx = torch.from_numpy(coord)
        p = symbol_pmf(family[idx], scale[idx], torch.from_numpy(q), span[idx]).numpy()
        p = p / np.add.reduceat(p, seg[:-1])[coord]
        freq = np.floor(p * (_TOTAL - alphabet[coord])).astype(np.int64) + 1
        freq[seg[:-1] + span_np] += _TOTAL - np.add.reduceat(freq, seg[:-1])  # the remainder goes to code 0
        within = np.cumsum(freq)
        within -= np.repeat(within[seg[:-1]] - freq[seg[:-1]], alphabet)  # cumulative within each coordinate
        cdf = np.insert(within, seg[:-1], 0)  # coordinate j's CDF starts at seg[j] + j
        offset = seg + np.arange(k + 1)
        # Bucket starts by one search over all coordinates: coordinate j's CDF values shifted by j * 2^25 are
        # increasing across the whole array.
        lift = np.repeat(np.arange(k, dtype=np.int64) << (PRECISION + 1), alphabet + 1)
        slots = np.arange((1 << BUCKET_BITS) + 1, dtype=np.int64) << _SHIFT
        slots[-1] = _TOTAL - 1
        queries = (np.arange(k, dtype=np.int64)[:, None] << (PRECISION + 1)) + slots[None, :]
        buckets = np.searchsorted(cdf + lift, queries, side="right") - 1 - offset[:-1, None]
        return cls(cdf.astype(np.int32), offset, np.ascontiguousarray(buckets, dtype=np.int32))

    def cross_entropy_bits(self, symbols: np.ndarray) -> float:
        """Bits the quantized tables spend on ``symbols [k, n]`` (0-based symbol indices), before stream overhead."""
        k, _ = symbols.shape
        base = self.cdf_offset[:-1, None] + symbols
        freq = self.cdf[base + 1].astype(np.float64) - self.cdf[base]
        return float(-np.log2(freq / _TOTAL).sum())


def encode(codes: np.ndarray, tables: RansTables) -> bytes:
    """Codes ``[n, k]`` (token-major, as the quantizer makes them; symbol = code + span) -> the stream's bytes."""
    n, k = codes.shape
    if k != len(tables):
        raise ValueError(f"{k} coordinates of codes for {len(tables)} symbol tables")
    if k * n == 0:
        return b""
    out = np.empty(k * n + STATE_WORDS, dtype=np.uint32)  # a symbol renormalises at most one word
    start = _encode(np.ascontiguousarray(codes, dtype=np.int32), tables.cdf, tables.cdf_offset, out)
    if start == SYMBOL_OUT_OF_RANGE:
        raise ValueError("a code lies outside its symbol model's span")
    if start < 0:
        raise RuntimeError(f"rANS encoder failed ({start})")
    return out[start:].astype("<u4", copy=False).tobytes()


def decode(data: bytes, n: int, tables: RansTables) -> tuple[np.ndarray, int]:
    """Bytes -> codes ``[n, k]`` (symbol index - span: token-major, as the quantizer made them) and a status:
    ``OK``, ``TOO_SHORT``, ``RAN_OUT`` or ``UNCLEAN_END``."""
    k = len(tables)
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32, copy=False)
    out = np.empty((n, k), dtype=np.int32)
    status = _decode(words, tables.cdf, tables.cdf_offset, tables.buckets, out)
    return out, int(status)


# --- compiled kernels -----------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True, error_model="numpy")  # frequencies are >= 1: no zero-divisor branch
def _encode(codes, cdf, offset, out):  # pragma: no cover - compiled
    # Backwards over coordinates and tokens, so that the decoder reads forwards; token i uses state i mod 4.
    n, k = codes.shape
    low = np.uint64(_STATE_LOW)
    states = np.full(LANES, low, dtype=np.uint64)
    w = out.shape[0]
    for j in range(k - 1, -1, -1):
        base = offset[j]
        alphabet = offset[j + 1] - base - 1
        span = alphabet >> 1
        for i in range(n - 1, -1, -1):
            s = codes[i, j] + span
            if s < 0 or s >= alphabet:
                return SYMBOL_OUT_OF_RANGE
            lane = i & (LANES - 1)
            x = states[lane]
            start = np.uint64(cdf[base + s])
            freq = np.uint64(cdf[base + s + 1]) - start
            if x >= freq << np.uint64(63 - PRECISION):  # ((2^31 >> PRECISION) << 32) * freq
                if w <= STATE_WORDS:
                    return OUTPUT_FULL
                w -= 1
                out[w] = np.uint32(x & np.uint64(0xFFFFFFFF))
                x >>= np.uint64(32)
            states[lane] = ((x // freq) << np.uint64(PRECISION)) + (x % freq) + start
    for lane in range(LANES - 1, -1, -1):
        x = states[lane]
        w -= 1
        out[w] = np.uint32(x >> np.uint64(32))
        w -= 1
        out[w] = np.uint32(x & np.uint64(0xFFFFFFFF))
    return w


@numba.njit(inline="always")
def _step(x, cdf, base, buckets, j):  # pragma: no cover - compiled
    slot = np.int64(x & np.uint64(_TOTAL - 1))
    b = slot >> _SHIFT
    lo = np.int64(buckets[j, b])
    hi = np.int64(buckets[j, b + 1])
    while lo < hi:  # the largest symbol whose CDF is <= slot
        mid = (lo + hi + 1) >> 1
        if cdf[base + mid] <= slot:
            lo = mid
        else:
            hi = mid - 1
    start = np.int64(cdf[base + lo])
    freq = np.int64(cdf[base + lo + 1]) - start
    return np.uint64(freq) * (x >> np.uint64(PRECISION)) + np.uint64(slot - start), lo


@numba.njit(inline="always")
def _refill(x, words, p):  # pragma: no cover - compiled
    if x < np.uint64(_STATE_LOW):
        return (x << np.uint64(32)) | np.uint64(words[p]), p + 1
    return x, p


@numba.njit(inline="always")
def _refill_unchecked(x, words, p):  # pragma: no cover - compiled
    # Branch-free (a refill is a coin toss the predictor loses): the word is read whether or not it is used,
    # so the caller guarantees p < len(words).
    need = x < np.uint64(_STATE_LOW)
    w = np.uint64(words[p])
    x = ((x << np.uint64(32)) | w) if need else x
    return x, p + np.int64(need)


@numba.njit(cache=True, nogil=True)
def _decode(words, cdf, offset, buckets, out):  # pragma: no cover - compiled
    n, k = out.shape
    nw = words.shape[0]
    if nw < STATE_WORDS:
        return TOO_SHORT
    x0 = np.uint64(words[0]) | (np.uint64(words[1]) << np.uint64(32))
    x1 = np.uint64(words[2]) | (np.uint64(words[3]) << np.uint64(32))
    x2 = np.uint64(words[4]) | (np.uint64(words[5]) << np.uint64(32))
    x3 = np.uint64(words[6]) | (np.uint64(words[7]) << np.uint64(32))
    low = np.uint64(_STATE_LOW)
    p = STATE_WORDS
    whole = n - (n % LANES)
    for j in range(k):
        base = offset[j]
        span = (offset[j + 1] - base - 2) >> 1  # A = 2 * span + 1 symbols, A + 1 CDF entries
        for i in range(0, whole, LANES):
            x0, s0 = _step(x0, cdf, base, buckets, j)
            x1, s1 = _step(x1, cdf, base, buckets, j)
            x2, s2 = _step(x2, cdf, base, buckets, j)
            x3, s3 = _step(x3, cdf, base, buckets, j)
            out[i, j] = s0 - span
            out[i + 1, j] = s1 - span
            out[i + 2, j] = s2 - span
            out[i + 3, j] = s3 - span
            if p + LANES <= nw:
                x0, p = _refill_unchecked(x0, words, p)
                x1, p = _refill_unchecked(x1, words, p)
                x2, p = _refill_unchecked(x2, words, p)
                x3, p = _refill_unchecked(x3, words, p)
            else:  # near the end of the words: the refills might run out
                if int(x0 < low) + int(x1 < low) + int(x2 < low) + int(x3 < low) > nw - p:
                    return RAN_OUT
                x0, p = _refill(x0, words, p)
                x1, p = _refill(x1, words, p)
                x2, p = _refill(x2, words, p)
                x3, p = _refill(x3, words, p)
        for i in range(whole, n):  # the last n mod 4 tokens use states 0, 1, 2
            lane = i & (LANES - 1)
            x = x0 if lane == 0 else (x1 if lane == 1 else x2)
            x, s = _step(x, cdf, base, buckets, j)
            out[i, j] = s - span
            if x < low and p >= nw:
                return RAN_OUT
            x, p = _refill(x, words, p)
            if lane == 0:
                x0 = x
            elif lane == 1:
                x1 = x
            else:
                x2 = x
    if p != nw or x0 != low or x1 != low or x2 != low or x3 != low:
        return UNCLEAN_END
    return OK
