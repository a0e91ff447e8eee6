"""The kvpress comparison's analysis (scripts/bench_vs_kvpress.py): rows from a worker's output, the agreement check.

kvpress itself is never imported here; the worker's output is built by hand.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from kvcal.eval.harness import EvalReport, EvalRow, EvalSettings

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_vs_kvpress.py"
SETTINGS = EvalSettings(prefix=64, continuation=8, sink=4, window=16, windows=6, needles=5, needle_context=80)
NEEDLE_TOKENS = 24


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_kvpress", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method, ratio, window_nll, trial_hits, base_nll=None):
    tokens = SETTINGS.continuation * len(window_nll)
    ppl = math.exp(sum(window_nll) / tokens)
    delta = 0.0 if base_nll is None else 100 * (math.exp((sum(window_nll) - sum(base_nll)) / tokens) - 1)
    return EvalRow(method, ratio, 1.0 if ratio is None else ratio, ppl, delta,
                   sum(trial_hits) / (NEEDLE_TOKENS * len(trial_hits)), 100, 100, 0.0, "",
                   tuple(window_nll), tuple(trial_hits))


BASE_NLL = [20.0, 22.0, 19.0, 25.0, 21.0, 23.0]
BASE_HITS = [24, 24, 24, 22, 24]


def report_with(rows) -> EvalReport:
    return EvalReport("m", None, SETTINGS, rows[0].ppl, rows[0].ppl * 1.05, rows[0].retrieval, 0.1, list(rows))


def test_kvpress_rows_measure_against_kvcals_full_cache(bench):
    base = row("uncompressed", None, BASE_NLL, BASE_HITS)
    worker = {"rows": [
        {"kind": "none", "name": "kvpress-none", "ratio": None, "window_nll": BASE_NLL, "trial_hits": BASE_HITS,
         "stored_bytes": 1, "bf16_bytes": 1, "seconds": 0.0},
        {"kind": "press", "name": "kvpress-snapkv", "press": "snapkv", "ratio": 8.0,
         "window_nll": [x + 0.8 for x in BASE_NLL], "trial_hits": [6, 5, 4, 6, 5], "stored_bytes": 250,
         "bf16_bytes": 2000, "seconds": 1.0, "kept_per_layer_needle": [30, 30]},
    ]}
    rows = bench.kvpress_rows(worker, report_with([base]), SETTINGS.continuation, NEEDLE_TOKENS)
    assert [r.method for r in rows] == ["kvpress-snapkv"]  # the no-press sanity run is not a method
    r = rows[0]
    assert r.measured_ratio == 8.0 and r.retrieval == pytest.approx(26 / (5 * 24))
    assert r.ppl_delta_pct == pytest.approx(100 * (math.exp(0.8 / SETTINGS.continuation) - 1))
    assert r.detail == "kept per layer (needle): 30 each"


def test_agreement_separates_the_same_method_from_a_different_one(bench):
    base = row("uncompressed", None, BASE_NLL, BASE_HITS)
    ours = row("snapkv", 8.0, [x + 1.0 for x in BASE_NLL], [8, 7, 9, 6, 8], BASE_NLL)
    same = row("kvpress-snapkv", 8.0, [x + 1.0 for x in BASE_NLL], [8, 7, 9, 6, 8], BASE_NLL)
    worse = row("kvpress-pyramidkv", 8.0, [x + 1.0 for x in BASE_NLL], [2, 1, 2, 1, 2], BASE_NLL)
    checks = bench.agreement(report_with([base, ours, same, worse]), SETTINGS.continuation, NEEDLE_TOKENS)
    by_pair = {(c["method"], c["kvpress"]): c for c in checks}
    identical = by_pair[("snapkv", "kvpress-snapkv")]
    assert identical["needle"]["diff"] == 0 and identical["needle"]["ci95"] == [0, 0]
    assert identical["ppl_pct"]["agree"] and identical["needle"]["agree"]
    assert ("pyramidkv", "kvpress-pyramidkv") not in by_pair  # no kvcal pyramidkv row to pair it with
    worse_than_ours = bench.paired_bootstrap(ours, worse, BASE_NLL, SETTINGS.continuation, NEEDLE_TOKENS)
    assert worse_than_ours["needle"]["diff"] == pytest.approx((38 - 8) / (5 * 24))
    assert worse_than_ours["needle"]["ci95"][0] > 0 and not worse_than_ours["needle"]["agree"]


def test_summary_tables_every_method_and_its_headline(bench):
    base = row("uncompressed", None, BASE_NLL, BASE_HITS)
    kvtc = row("kvtc", 8.0, [x + 0.01 for x in BASE_NLL], BASE_HITS, BASE_NLL)
    quant = row("kvpress-quanto4", None, [x + 0.02 for x in BASE_NLL], BASE_HITS, BASE_NLL)
    lines = "\n".join(bench.summary([report_with([base, kvtc, quant])]))
    assert "| kvtc | +0.13 / 0.98 | 8.0x |" in lines
    assert "| kvpress-quanto4 | 1.00x |" in lines and "| uncompressed |" not in lines
