"""Calibrated scalar quantizers for PCA coordinates: one step per coordinate, fitted at calibration.

Nothing is stored per token: coordinate ``i`` of every token is coded as ``q = round(c / step_i)``, clipped to
its symbol model's span, and decoded at the bin centre ``q * step_i`` (centre reconstruction, not a dead zone:
measured, a dead zone lowers perplexity but loses retrieval). Because the decoder's output re-encodes to the
same codes, re-compressing a decoded cache does not drift. Steps, spans and which coordinates are kept come
from the artifact (``kvcal.fit.steps``); a pruned coordinate (step 0) is not coded and decodes to zero.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numba
import numpy as np
import torch

from kvcal.codec.entropy import SymbolModels


@dataclass(frozen=True)
class CoordinateQuantizer:
    """The kept coordinates of one PCA group at one ratio: their indices, steps and symbol models."""

    kept: torch.Tensor  # [k] int64 indices into the basis columns, increasing
    step: torch.Tensor  # [k] float32
    models: SymbolModels  # stays on the host: the entropy stage reads it
    bound: torch.Tensor | None = None  # [k] float32 span, beside ``step`` (set by ``to``)

    @classmethod
    def from_table(cls, table: torch.Tensor) -> CoordinateQuantizer:
        """From the artifact's ``[r, 4]`` rows ``(step, family, scale, span)``; step 0 = pruned."""
        kept = torch.nonzero(table[:, 0] > 0).flatten()
        rows = table[kept].double()
        return cls(kept, rows[:, 0].float(), SymbolModels(rows[:, 1].round().long(), rows[:, 2], rows[:, 3].round().long()))

    def __len__(self) -> int:
        return int(self.kept.numel())

    def to(self, device) -> CoordinateQuantizer:
        """This quantizer with its step and span (as float32) on ``device``, so quantizing there copies nothing."""
        device = torch.device(device)
        if self.bound is not None and self.step.device == device:
            return self
        return replace(self, step=self.step.to(device), bound=self.models.span.to(device, torch.float32))

    def quantize(self, coords: torch.Tensor) -> torch.Tensor:
        """Kept coordinates ``[n, k]`` -> int32 codes ``[n, k]`` (on the CPU: they leave for the entropy coder)."""
        if coords.device.type == self.step.device.type == "cpu" and coords.dtype == torch.float32 and coords.is_contiguous():
            # One compiled pass (and no GIL: the codec runs it on its entropy worker) for torch's five.
            codes = np.empty(tuple(coords.shape), dtype=np.int32)
            _quantize(coords.numpy(), self.step.numpy(), self.models.span.to(torch.float32).numpy(), codes)
            return torch.from_numpy(codes)
        step = self.step.to(coords.device)
        span = (self.models.span if self.bound is None else self.bound).to(coords.device, torch.float32)
        # NaN/inf in a cache would make rounding undefined; they are clipped like any out-of-span value.
        q = torch.div(coords.float(), step).nan_to_num_(nan=0.0).round_()
        return torch.clamp(q, min=-span, max=span).to(torch.int32).cpu()

    def dequantize(self, codes: torch.Tensor, device) -> torch.Tensor:
        """Codes ``[n, k]`` -> float32 coordinates ``[n, k]`` at the bin centres (int32 times float32: one pass)."""
        device = torch.device(device)
        if device.type == codes.device.type == self.step.device.type == "cpu" and codes.dtype == torch.int32 \
                and codes.is_contiguous():
            out = torch.empty(tuple(codes.shape), dtype=torch.float32)  # compiled: no GIL, no intra-op threads
            _dequantize(codes.numpy(), self.step.numpy(), out.numpy())
            return out
        return torch.mul(codes.to(device), self.step.to(device))


@numba.njit(cache=True, nogil=True, error_model="numpy")  # no zero-divisor branch: steps are > 0
def _quantize(coords, step, span, out):  # pragma: no cover - compiled
    # torch's expression element by element: float32 division, NaN -> 0, round half to even, clip to the span.
    n, k = coords.shape
    for t in range(n):
        for j in range(k):
            q = coords[t, j] / step[j]
            if np.isnan(q):
                q = np.float32(0.0)
            q = min(max(np.rint(q), -span[j]), span[j])
            out[t, j] = np.int32(q)


@numba.njit(cache=True, nogil=True)
def _dequantize(codes, step, out):  # pragma: no cover - compiled
    n, k = codes.shape
    for t in range(n):
        for j in range(k):
            out[t, j] = np.float32(codes[t, j]) * step[j]
