"""Step allocation: which quantizer step each PCA coordinate gets, at the rate the entropy stage really spends.

For every coordinate ``i`` (of the keys' and the values' bases) and every step on a menu (``sigma_i * 2^(-m/4)``,
from two standard deviations, ~0.5 bit, down to ~13 bits), the calibration **measures** on held-out tokens:
- the distortion ``D`` — mean squared error of uniform rounding in the metric's space (``kvcal.fit.metric``),
  so errors add across coordinates and across keys and values alike;
- the rate ``R`` — bits per token under the symbol model the entropy stage will use (``kvcal.codec.entropy``),
  fitted on the same codes: the better of a quantized Gaussian and a quantized Laplace;
plus the option of pruning it (``R = 0``, ``D`` = its mean square).

``allocate_steps`` then picks one option per coordinate minimising total distortion subject to a total rate:
a multiple-choice knapsack, solved by Lagrangian relaxation (each coordinate independently minimises
``D + lambda R``; ``lambda`` is bisected until the rate fits). That is exact on the lower convex hull of each
coordinate's options, which at these menu densities is within a fraction of a percent of the knapsack optimum,
and it needs no discretisation of fractional rates. A **joint** budget lets keys and values trade bits under one
``lambda`` (one currency, since the metric measures both as output error); ``split`` gives each kind its share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcal.errors import RatioError
from kvcal.fit.symbols import MAX_SPAN, PMF_FLOOR, symbol_pmf

BUDGETS = ("joint", "split")
# Menu: step = sigma * 2^(-m / STEPS_PER_OCTAVE) for m in MENU.
STEPS_PER_OCTAVE = 4
MENU = range(-4, 53)
# Below this scale (in steps) Gaussian bins are integrated exactly; above, the density approximation is within
# ~0.01 bit.
EXACT_BELOW = 3.0


@dataclass(frozen=True)
class RateDistortion:
    """Measured options of ``r`` coordinates: ``[r, S]`` tensors per menu step, plus pruning."""

    step: torch.Tensor  # [r, S] float64
    rate: torch.Tensor  # [r, S] bits per token (inf where the span would exceed MAX_SPAN)
    distortion: torch.Tensor  # [r, S]
    family: torch.Tensor  # [r, S] int64, 0 gaussian / 1 laplace
    scale: torch.Tensor  # [r, S] model scale in steps
    span: torch.Tensor  # [r, S] int64
    prune_distortion: torch.Tensor  # [r]

    @property
    def r(self) -> int:
        return self.step.shape[0]

    def to(self, device) -> RateDistortion:
        """The same tables on ``device`` (calibration measures on the GPU and allocates on the host)."""
        return RateDistortion(*(getattr(self, f).to(device) for f in (
            "step", "rate", "distortion", "family", "scale", "span", "prune_distortion")))


def _gaussian_bits(q: torch.Tensor, s: float, span: torch.Tensor) -> torch.Tensor:
    """Mean bits per code ``[r]`` of codes ``q`` ``[n, r]`` under the quantized Gaussian of std ``s`` (steps)."""
    if s < EXACT_BELOW:
        p = symbol_pmf(torch.tensor(0), torch.tensor(s), q, span[None])
        return -torch.log2(p).mean(0)
    # Wide bins are the density times the bin width, to O(1/s^2): no transcendental per code.
    return math.log2(s * math.sqrt(2 * math.pi)) + q.square().mean(0).double() / (2 * s * s * math.log(2))


def _laplace_bits(q: torch.Tensor, b: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Mean bits per code ``[r]`` under the quantized Laplace of scale ``b`` ``[r]`` (steps), in closed form:
    ``P(0) = 1 - e^(-1/2b)`` and ``P(q) = e^(-|q|/b) sinh(1/2b)``, so only the share of zeros and ``E|q|`` matter."""
    b = b.clamp_min(1e-12)
    zeros = (q == 0).double().mean(0)
    floor = PMF_FLOOR * (2 * span + 1)
    log_p0 = torch.log2(-torch.expm1(-0.5 / b) + PMF_FLOOR) - torch.log2(1 + floor)
    log_sinh = torch.log2(torch.sinh(0.5 / b).clamp_min(1e-300))
    return -zeros * log_p0 - (1 - zeros) * log_sinh + q.abs().mean(0).double() / (b * math.log(2))


def measure_rate_distortion(coords: torch.Tensor) -> RateDistortion:
    """Every menu option of every coordinate, measured on held-out ``coords`` ``[n, r]``.

    Steps are relative to each coordinate's RMS ``sigma``, so the Gaussian model's scale in steps is the same for
    every coordinate of one option; that and the closed-form Laplace keep this to a few passes over ``coords``.
    """
    if coords.dim() != 2 or coords.shape[0] < 1 or coords.shape[1] < 1:
        raise ValueError(f"expected coords of shape [tokens >= 1, r >= 1], got {tuple(coords.shape)}")
    c = coords.to(torch.float64)
    n, r = c.shape
    sigma = c.square().mean(0).sqrt().clamp_min(1e-30)
    factors = [2.0 ** (-m / STEPS_PER_OCTAVE) for m in MENU]
    steps = sigma[:, None] * torch.tensor(factors, dtype=torch.float64, device=c.device)[None, :]  # [r, S]
    shape = (r, len(factors))
    rate, distortion, scale = (torch.empty(shape, dtype=torch.float64, device=c.device) for _ in range(3))
    family, span = (torch.empty(shape, dtype=torch.int64, device=c.device) for _ in range(2))
    unit = (c / sigma).float()  # coordinates in units of their RMS; float32 halves the passes' cost
    for j, f in enumerate(factors):
        u = unit / f  # [n, r], in steps
        q = u.round()
        distortion[:, j] = (u - q).square().mean(0).double() * steps[:, j].square()
        sp = ((q.abs().amax(0).double() * 2).ceil() + 2).clamp(max=MAX_SPAN + 1)
        s_gauss = 1.0 / f
        b_lap = u.abs().mean(0).double()
        bits_g = _gaussian_bits(q, s_gauss, sp)
        bits_l = _laplace_bits(q, b_lap, sp)
        lap = bits_l < bits_g
        best = torch.where(lap, bits_l, bits_g)
        rate[:, j] = torch.where(sp > MAX_SPAN, torch.full_like(best, math.inf), best)
        scale[:, j] = torch.where(lap, b_lap, torch.full_like(b_lap, s_gauss))
        family[:, j] = lap.to(torch.int64)
        span[:, j] = sp.clamp(max=MAX_SPAN).to(torch.int64)
    return RateDistortion(steps, rate, distortion, family, scale, span, c.square().mean(0))


@dataclass(frozen=True)
class StepAllocation:
    """One coordinate's choice per row: ``step`` 0 means pruned. ``table()`` is what the artifact stores."""

    step: torch.Tensor  # [r] float64
    family: torch.Tensor  # [r] int64
    scale: torch.Tensor  # [r] float64
    span: torch.Tensor  # [r] int64
    rate: float  # bits per token
    distortion: float  # expected metric error per token

    def kept(self) -> int:
        return int((self.step > 0).sum())

    def table(self) -> torch.Tensor:
        """``[r, 4]`` float32 rows ``(step, family, scale, span)``."""
        return torch.stack([self.step, self.family.double(), self.scale, self.span.double()], dim=1).float()


def _choose(rd: RateDistortion, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate the option index minimising ``D + lam R`` (``-1`` = prune) and its rate."""
    cost = rd.distortion + lam * rd.rate
    best_cost, best = cost.min(dim=1)
    prune = rd.prune_distortion <= best_cost
    idx = torch.where(prune, torch.full_like(best, -1), best)
    rate = torch.where(prune, torch.zeros_like(best_cost), rd.rate.gather(1, best[:, None])[:, 0])
    return idx, rate


def _allocation(rd: RateDistortion, idx: torch.Tensor) -> StepAllocation:
    keep = idx >= 0
    safe = idx.clamp_min(0)[:, None]

    def pick(t: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, t.gather(1, safe)[:, 0], torch.zeros((), dtype=t.dtype))

    rate = float(pick(rd.rate).sum())
    distortion = float(torch.where(keep, rd.distortion.gather(1, safe)[:, 0], rd.prune_distortion).sum())
    return StepAllocation(pick(rd.step), pick(rd.family), pick(rd.scale), pick(rd.span), rate, distortion)


def allocate_steps(tables: dict[str, RateDistortion], budget_bits: float, iterations: int = 48) -> dict[str, StepAllocation]:
    """Least total distortion over all ``tables`` (one per basis) with total rate ``<= budget_bits`` per token.

    Raises ``RatioError`` when the budget keeps no coordinate of any basis.
    """
    if not math.isfinite(budget_bits) or budget_bits <= 0:
        raise RatioError(f"a budget of {budget_bits:g} bits/token cannot be met; use a lower compression ratio")
    names = list(tables)

    def total_rate(lam: float) -> tuple[float, dict[str, torch.Tensor]]:
        picks = {name: _choose(tables[name], lam) for name in names}
        return sum(float(rate.sum()) for _, rate in picks.values()), {name: p[0] for name, p in picks.items()}

    scale = max(float(rd.prune_distortion.max()) for rd in tables.values()) or 1.0
    lo, hi = math.log(scale * 1e-16), math.log(scale * 1e4)  # lambda per bit, in the distortions' units
    rate, picks = total_rate(math.exp(lo))
    if rate > budget_bits:
        for _ in range(iterations):  # smallest lambda whose rate fits: the most distortion the budget buys back
            mid = (lo + hi) / 2
            mid_rate, mid_picks = total_rate(math.exp(mid))
            if mid_rate <= budget_bits:
                hi, picks = mid, mid_picks
            else:
                lo = mid
        _, picks = total_rate(math.exp(hi))
    result = {name: _allocation(tables[name], picks[name]) for name in names}
    # One basis may lose every coordinate when the metric says its error costs less than the others' (it then
    # decodes to its mean); a budget that keeps nothing at all is a ratio the data cannot reach.
    if all(alloc.kept() == 0 for alloc in result.values()):
        raise RatioError(f"a budget of {budget_bits:g} bits/token keeps no coordinate at all; "
                         "use a lower compression ratio")
    return result
