"""Calibrated scalar quantizers for PCA coordinates: one step per coordinate, fitted at calibration.

Nothing is stored per token: coordinate ``i`` of every token is coded as ``q = round(c / step_i)``, clipped to
its symbol model's span, and decoded at the bin centre ``q * step_i`` (centre reconstruction, not a dead zone:
measured, a dead zone lowers perplexity but loses retrieval). Because the decoder's output re-encodes to the
same codes, re-compressing a decoded cache does not drift. Steps, spans and which coordinates are kept come
from the artifact (``kvcal.fit.steps``); a pruned coordinate (step 0) is not coded and decodes to zero.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
        step = self.step.to(coords.device)
        span = (self.models.span if self.bound is None else self.bound).to(coords.device, torch.float32)
        # NaN/inf in a cache would make rounding undefined; they are clipped like any out-of-span value.
        q = torch.div(coords.float(), step).nan_to_num_(nan=0.0).round_()
        return torch.clamp(q, min=-span, max=span).to(torch.int32).cpu()

    def dequantize(self, codes: torch.Tensor, device) -> torch.Tensor:
        """Codes ``[n, k]`` -> float32 coordinates ``[n, k]`` at the bin centres."""
        return codes.to(device, torch.float32) * self.step.to(device)
