"""The entropy stage: calibrated per-coordinate symbol models and the coders that spend bits under them.

Each kept PCA coordinate's integer codes ``q`` (``kvcal.codec.quantize``) get a **symbol model** fitted at
calibration and stored in the artifact: a family (a Gaussian or a Laplace quantized to unit bins, whichever
gives held-out codes fewer bits), its scale in units of the step, and a span ``[-span, span]`` outside which
codes are clipped. ``symbol_pmf`` is the one formula both sides use: the calibration's rate measurements
(``kvcal.fit.steps``) and the coder's probability tables, so the allocator costs exactly what the coder spends.

Stages (``ENTROPY_STAGES``, by name):
- ``rans`` (the default): kvcal's own rANS (``kvcal.codec.rans``, compiled by numba), four interleaved states,
  24-bit frequencies quantized from ``symbol_pmf``. Same size as ``ans`` to within 40 bytes a section; decodes
  3-5x faster and releases the GIL (``releases_gil``: the codec decodes sections on worker threads). Bounded work
  per symbol whatever the bytes; the stream must end exactly where the encoder started.
- ``ans``: rANS through ``constriction`` (Rust), one categorical table per coordinate, coordinate-major. Within
  ~1% of the model's cross-entropy. Its decoder does a fixed amount of work per symbol whatever the bytes, so
  hostile input cannot make it loop or allocate beyond the ``n x k`` codes the (validated) header implies; the
  stream must also end exactly where the encoder started, which catches most payload edits.
- ``zstd``: the codes as little-endian int16, coordinate-major, left to the container's zstd (kvcal v1's stage
  and the ablation's baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Protocol

import numpy as np
import torch

from kvcal.errors import BitstreamError
from kvcal.fit.symbols import FAMILIES, MAX_SPAN, PMF_FLOOR, symbol_pmf  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class SymbolModels:
    """The symbol models of the ``k`` kept coordinates of one PCA group at one ratio, in coding order."""

    family: torch.Tensor  # [k] int
    scale: torch.Tensor  # [k] float
    span: torch.Tensor  # [k] int

    def __len__(self) -> int:
        return int(self.span.numel())

    @cached_property
    def spans(self) -> np.ndarray:
        return self.span.to(torch.int64).numpy()

    @cached_property
    def min_token_bits(self) -> float:
        """The fewest bits one token can cost: every coordinate at its likeliest code, 0."""
        if not len(self):
            return 0.0
        return float(-torch.log2(symbol_pmf(self.family, self.scale, torch.zeros_like(self.span), self.span)).sum())

    @cached_property
    def tables(self) -> list:
        """One ``constriction`` categorical model per coordinate over symbols ``0 .. 2 * span`` (code + span)."""
        import constriction

        out = []
        for f, s, r in zip(self.family.tolist(), self.scale.tolist(), self.span.tolist(), strict=True):
            q = torch.arange(-int(r), int(r) + 1)
            pmf = symbol_pmf(torch.tensor(f), torch.tensor(s), q, torch.tensor(r)).numpy()
            out.append(constriction.stream.model.Categorical(pmf / pmf.sum(), perfect=False))
        return out

    @cached_property
    def rans_tables(self):
        """The quantized CDFs and bucket tables kvcal's own rANS codes with (``kvcal.codec.rans``)."""
        from kvcal.codec.rans import RansTables

        return RansTables.from_models(self.family, self.scale, self.span)


class EntropyStage(Protocol):
    name: ClassVar[str]
    container_zstd: ClassVar[bool]  # whether the blob container should zstd the section
    releases_gil: ClassVar[bool]  # whether encode/decode run in parallel on threads (worth a worker thread)

    def encode(self, codes: np.ndarray, models: SymbolModels) -> bytes: ...

    def decode(self, data: bytes, n: int, models: SymbolModels) -> np.ndarray: ...

    def raw_size_bounds(self, n: int, k: int, min_token_bits: float = 0.0) -> tuple[int, int]: ...


def _no_codes(data: bytes, n: int, k: int) -> np.ndarray:
    """The ``[n, k]`` codes of a section that holds none (no tokens or no kept coordinates): it must be empty."""
    if data:
        raise BitstreamError("kvcal blob: an entropy-coded section holds bytes where no codes are expected")
    return np.zeros((n, k), dtype=np.int32)


class AnsStage:
    """rANS over every coordinate's codes with its calibrated table (``constriction``'s stack coder)."""

    name: ClassVar[str] = "ans"
    container_zstd: ClassVar[bool] = False
    releases_gil: ClassVar[bool] = False

    def encode(self, codes: np.ndarray, models: SymbolModels) -> bytes:
        import constriction

        n, k = codes.shape
        if k == 0 or n == 0:
            return b""
        symbols = np.ascontiguousarray((codes + models.spans[None, :]).T.astype(np.int32))
        coder = constriction.stream.stack.AnsCoder()
        tables = models.tables
        for j in range(k - 1, -1, -1):  # a stack: encode backwards so the decoder reads coordinate 0 first
            coder.encode_reverse(symbols[j], tables[j])
        return coder.get_compressed().astype("<u4").tobytes()

    def decode(self, data: bytes, n: int, models: SymbolModels) -> np.ndarray:
        import constriction

        k = len(models)
        if k == 0 or n == 0:
            return _no_codes(data, n, k)
        if len(data) % 4 or not data:
            raise BitstreamError("kvcal blob: an ANS section is not a whole number of 32-bit words")
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        out = np.empty((k, n), dtype=np.int32)
        try:
            coder = constriction.stream.stack.AnsCoder(words)
            tables = models.tables
            for j in range(k):
                out[j] = coder.decode(tables[j], n)
            clean = coder.is_empty()
        except BitstreamError:
            raise
        except Exception as err:  # constriction refuses malformed streams with ValueError and friends
            raise BitstreamError(f"kvcal blob: an ANS section does not decode ({str(err).splitlines()[0]})") from None
        if not clean:
            raise BitstreamError("kvcal blob: an ANS section does not decode cleanly (corrupted payload)")
        return (out - models.spans[:, None]).T

    def raw_size_bounds(self, n: int, k: int, min_token_bits: float = 0.0) -> tuple[int, int]:
        if n * k == 0:
            return 0, 0
        # A floored symbol costs at most -log2(PMF_FLOOR / 2) < 25 bits; the coder adds at most two words.
        # No token costs under ``min_token_bits`` (constriction's tables: over 99.9% of it, measured), so a stream
        # holds at least half of n times that: a few bytes cannot claim millions of tokens to allocate and decode.
        lo = max(4, 4 * (math.floor(n * min_token_bits / 64) - 2))
        return lo, 4 * (math.ceil(n * k * 25 / 32) + 2)


class RansStage:
    """kvcal's own interleaved rANS (``kvcal.codec.rans``) over the same calibrated models as ``ans``."""

    name: ClassVar[str] = "rans"
    container_zstd: ClassVar[bool] = False
    releases_gil: ClassVar[bool] = True  # numba nogil kernels

    def encode(self, codes: np.ndarray, models: SymbolModels) -> bytes:
        from kvcal.codec import rans

        n, k = codes.shape
        if k == 0 or n == 0:
            return b""
        return rans.encode(codes, models.rans_tables)

    def decode(self, data: bytes, n: int, models: SymbolModels) -> np.ndarray:
        from kvcal.codec import rans

        k = len(models)
        if k == 0 or n == 0:
            return _no_codes(data, n, k)
        if len(data) % 4 or len(data) < 4 * rans.STATE_WORDS:
            raise BitstreamError("kvcal blob: a rANS section is shorter than its states or not whole 32-bit words")
        codes, status = rans.decode(data, n, models.rans_tables)
        if status == rans.RAN_OUT:
            raise BitstreamError("kvcal blob: a rANS section ends before its codes do (truncated or corrupted payload)")
        if status != rans.OK:
            raise BitstreamError("kvcal blob: a rANS section does not decode cleanly (corrupted payload)")
        return codes

    def raw_size_bounds(self, n: int, k: int, min_token_bits: float = 0.0) -> tuple[int, int]:
        from kvcal.codec.rans import PRECISION, STATE_WORDS

        if n * k == 0:
            return 0, 0
        # A symbol costs at most PRECISION bits; the states add STATE_WORDS words. No token costs under
        # ``min_token_bits`` (the tables give code 0 at least its modelled probability, less 2^-24 per symbol),
        # so half of n times that is a safe floor: a few bytes cannot claim millions of tokens to decode.
        lo = 4 * max(STATE_WORDS, math.floor(n * min_token_bits / 64))
        return lo, 4 * (math.ceil(n * k * PRECISION / 32) + STATE_WORDS)


class ZstdStage:
    """Codes as int16, coordinate-major; the container zstd-codes the section."""

    name: ClassVar[str] = "zstd"
    container_zstd: ClassVar[bool] = True
    releases_gil: ClassVar[bool] = False  # nothing to decode: the container already did

    def encode(self, codes: np.ndarray, models: SymbolModels) -> bytes:
        return np.ascontiguousarray(codes.T).astype("<i2").tobytes()

    def decode(self, data: bytes, n: int, models: SymbolModels) -> np.ndarray:
        k = len(models)
        if len(data) != 2 * n * k:
            raise BitstreamError(f"kvcal blob: a zstd code section holds {len(data)} bytes, {2 * n * k} expected")
        codes = np.frombuffer(data, dtype="<i2").astype(np.int32).reshape(k, n)
        # Hostile bytes may hold any int16; clip to the spans the encoder could have produced.
        return np.clip(codes, -models.spans[:, None], models.spans[:, None]).T

    def raw_size_bounds(self, n: int, k: int, min_token_bits: float = 0.0) -> tuple[int, int]:
        return 2 * n * k, 2 * n * k


ENTROPY_STAGES: dict[str, EntropyStage] = {stage.name: stage for stage in (RansStage(), AnsStage(), ZstdStage())}
DEFAULT_ENTROPY = "rans"


def entropy_stage(name: str) -> EntropyStage:
    from kvcal.errors import KvcalError

    if name not in ENTROPY_STAGES:
        raise KvcalError(f"unknown entropy stage {name!r}; choose one of {', '.join(ENTROPY_STAGES)}")
    return ENTROPY_STAGES[name]
