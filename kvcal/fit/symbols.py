"""Symbol models: the probability a calibrated coordinate gives each integer code.

One formula, used where the rate is measured (``kvcal.fit.steps``, at calibration) and where it is spent (the
entropy stage's tables, ``kvcal.codec.entropy``), so the allocator costs exactly what the coder spends. It lives
with the fitting code because calibration defines it and the artifact stores its parameters; the codec reads them.
"""

from __future__ import annotations

import math

import torch

FAMILIES = ("gaussian", "laplace")
MAX_SPAN = (1 << 15) - 1  # codes travel as int16 in the zstd stage
# Every symbol in the span keeps at least this probability, so a code the calibration never saw still codes
# (at ~23 bits) instead of failing; it also matches constriction's own leakiness.
PMF_FLOOR = 1e-7
_SQRT2 = math.sqrt(2.0)


def symbol_pmf(family: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Probability of integer code ``q`` under each model, float64, broadcasting all arguments.

    ``family`` 0 = Gaussian (``scale`` = std), 1 = Laplace (``scale`` = b), both in units of the step, zero mean,
    integrated over ``[q - 1/2, q + 1/2]``, floored at ``PMF_FLOOR`` and renormalised over ``[-span, span]``.
    """
    a = q.to(torch.float64).abs()
    s = scale.to(torch.float64).clamp_min(1e-12)
    lo, hi = (a - 0.5).clamp_min(0.0), a + 0.5
    gauss = 0.5 * (torch.erfc(lo / (s * _SQRT2)) - torch.erfc(hi / (s * _SQRT2)))
    lap = 0.5 * (torch.exp(-lo / s) - torch.exp(-hi / s))
    # The zero bin spans both sides of the origin: its mass is twice the one-sided integral above.
    zero = a < 0.5
    gauss = torch.where(zero, torch.erf(0.5 / (s * _SQRT2)), gauss)
    lap = torch.where(zero, 1.0 - torch.exp(-0.5 / s), lap)
    p = torch.where(family.to(torch.int64) == 1, lap, gauss).clamp_min(0.0)
    n_symbols = 2 * span.to(torch.float64) + 1
    return (p + PMF_FLOOR) / (1.0 + PMF_FLOOR * n_symbols)
