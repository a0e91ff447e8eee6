"""Paired bootstrap intervals (kvcal.eval.intervals) and the harness rows that carry them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvcal.eval.harness import NEEDLE_TOKENS_PER_TRIAL, EvalReport, EvalRow, EvalSettings
from kvcal.eval.intervals import accuracy_delta_interval, paired_bootstrap, ppl_delta_interval


def test_identical_methods_give_a_zero_width_interval():
    nll = [20.0, 22.5, 19.0, 25.0]
    ppl = ppl_delta_interval(nll, nll, 8)
    assert (ppl.estimate, ppl.low, ppl.high) == (0.0, 0.0, 0.0)
    acc = accuracy_delta_interval([3, 24, 0], [3, 24, 0], 24)
    assert (acc.estimate, acc.low, acc.high) == (0.0, 0.0, 0.0)


def test_seeded_and_deterministic():
    rng = np.random.default_rng(1)
    a, b = rng.normal(20, 2, 40), rng.normal(20, 2, 40)
    first = paired_bootstrap(a, b, 16, seed=3)
    assert paired_bootstrap(a, b, 16, seed=3) == first
    assert paired_bootstrap(a, b, 16, seed=4) != first
    assert first.low <= first.estimate <= first.high


def test_covers_the_true_delta_and_pairs_the_units():
    # Windows differ a lot from each other (shared between methods), the method adds a small noisy shift: a
    # paired interval is narrow around the true shift, where treating the units as unpaired would not be.
    rng = np.random.default_rng(0)
    tokens, shift = 128, 0.01  # NLL per token
    base = rng.normal(3.0, 0.5, 64) * tokens
    covered = 0
    for trial in range(50):
        noisy = base + rng.normal(shift, 0.02, 64) * tokens
        ci = ppl_delta_interval(noisy, base, tokens, seed=trial, resamples=500)
        covered += ci.holds(100 * math.expm1(shift))
        assert ci.high - ci.low < 2.0  # % points; unpaired, the windows' own spread would make it ~ 35
    assert covered >= 43  # nominal 95% of 50, with room for the percentile bootstrap's small-sample undercoverage


def test_accuracy_difference_sign_and_width():
    full = [24] * 30 + [20] * 10
    worse = [12] * 30 + [10] * 10
    ci = accuracy_delta_interval(worse, full, 24)
    assert ci.estimate == pytest.approx((12 * 30 + 10 * 10 - 24 * 30 - 20 * 10) / (40 * 24))
    assert ci.high < 0


def test_harness_rows_carry_intervals_that_survive_json():
    s = EvalSettings(prefix=64, continuation=8, sink=4, window=16, windows=6, needles=5, needle_context=80)
    base_nll, base_hits = (20.0, 22.0, 19.0, 25.0, 21.0, 23.0), (24, 24, 24, 22, 24)

    def row(method, ratio, nll, hits):
        return EvalRow(method, ratio, ratio or 1.0, math.exp(sum(nll) / 48), 0.0, sum(hits) / 120, 1, 1, 0.0, "",
                       tuple(nll), tuple(hits))

    base = row("uncompressed", None, base_nll, base_hits)
    worse = row("int4", None, [x + 0.5 for x in base_nll], (20, 21, 22, 20, 23))
    report = EvalReport("m", None, s, base.ppl, base.ppl * 2, base.retrieval, 0.1, [base, worse]).with_intervals()
    b, w = report.rows
    assert b.ppl_delta_ci == (0.0, 0.0) and b.retrieval_delta_ci == (0.0, 0.0)
    assert w.ppl_delta_ci[0] == pytest.approx(w.ppl_delta_ci[1]) == pytest.approx(100 * math.expm1(0.5 / 8))
    assert w.retrieval_delta_ci[1] < 0
    again = EvalReport.from_json(report.to_json())
    assert again.rows == report.rows
    assert report.to_json()["headline"]["needle_point_tokens"] == 5 * NEEDLE_TOKENS_PER_TRIAL / 100
    assert "1 point = 1.2 tokens" in report.table()


def test_first_failing_brackets_the_headline():
    s = EvalSettings(windows=1, needles=0)
    rows = [EvalRow("uncompressed", None, 1.0, 10.0, 0.0, None, 1, 1, 0.0)]
    for ratio, delta in ((4, 0.1), (8, 1.5), (16, 0.9), (32, 3.0)):
        rows.append(EvalRow("kvtc", ratio, ratio, 10.0, delta, None, 1, 1, 0.0))
    report = EvalReport("m", None, s, 10.0, 12.0, None, None, rows)
    assert report.headline()["kvtc"] == 16 and report.first_failing()["kvtc"] == 8
    assert report.first_failing()["uncompressed"] is None
