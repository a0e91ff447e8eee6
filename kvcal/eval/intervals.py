"""Paired bootstrap intervals for the harness's differences between two methods on the same windows and trials.

Every figure the harness compares is a ratio of sums over units (perplexity windows, needle trials): a method's
Δ against another is ``sum(a - b) / sum(weight)`` over the units (NLL per token for perplexity, then mapped
through ``exp``; hits per needle token for retrieval). Resampling the units with replacement, the same units for
both methods (they were scored on the same windows), gives the interval. Seeded: the same inputs give the same
interval on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the units as measured
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def holds(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_pair(self) -> tuple[float, float]:
        return (self.low, self.high)

    def map(self, f) -> Interval:
        """The interval of ``f(statistic)`` for a nondecreasing ``f``."""
        return Interval(f(self.estimate), f(self.low), f(self.high))


def paired_bootstrap(a: Sequence[float], b: Sequence[float] | None, weights: Sequence[float] | float,
                     seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL) -> Interval:
    """Interval of ``sum(a - b) / sum(weights)`` over units resampled in pairs (``b`` None: zeros).

    ``weights`` is one number per unit, or one number for every unit (e.g. tokens per window). The bounds are
    order statistics of the resampled values (percentile bootstrap); identical ``a`` and ``b`` give ``[0, 0]``.
    """
    a_arr = np.asarray(a, dtype=np.float64)
    n = a_arr.size
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one unit")
    diff = a_arr - (np.zeros(n) if b is None else np.asarray(b, dtype=np.float64))
    if diff.shape != (n,):
        raise ValueError(f"paired_bootstrap: {n} units against {np.asarray(b).size}")
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), (n,))
    estimate = float(diff.sum() / w.sum())
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    samples = np.sort(diff[idx].sum(axis=1) / w[idx].sum(axis=1))
    tail = (1.0 - level) / 2
    lo, hi = int(tail * resamples), int((1.0 - tail) * resamples) - 1
    return Interval(estimate, float(samples[lo]), float(samples[hi]))


def ppl_delta_interval(window_nll: Sequence[float], base_nll: Sequence[float], tokens_per_window: Sequence[float] | float,
                       seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL) -> Interval:
    """Δppl % of one method against another (``100 * (ppl / ppl_base - 1)``), from per-window NLL sums."""
    nll = paired_bootstrap(window_nll, base_nll, tokens_per_window, seed, resamples, level)
    return nll.map(lambda x: 100.0 * math.expm1(x))


def accuracy_delta_interval(trial_hits: Sequence[float], base_hits: Sequence[float] | None,
                            tokens_per_trial: Sequence[float] | float, seed: int = 0, resamples: int = RESAMPLES,
                            level: float = LEVEL) -> Interval:
    """Needle accuracy of one method minus another's (``base_hits`` None: the accuracy itself), from per-trial hits."""
    return paired_bootstrap(trial_hits, base_hits, tokens_per_trial, seed, resamples, level)
