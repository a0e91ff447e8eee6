"""bench_rate_quality's merge of an earlier run: kept rows, and refusal when settings or controls differ."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from kvcal.errors import DataError
from kvcal.eval.harness import EvalReport, EvalRow, EvalSettings

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_rate_quality.py"
SETTINGS = EvalSettings(prefix=64, continuation=8, sink=4, window=16, windows=3, needles=2, needle_context=80)
BASE_NLL, BASE_HITS = (20.0, 22.0, 19.0), (24, 22)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_rate_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method, ratio, shift=0.0, hits=BASE_HITS):
    nll = tuple(x + shift for x in BASE_NLL)
    return EvalRow(method, ratio, ratio or 1.0, math.exp(sum(nll) / 24), 100 * math.expm1(3 * shift / 24),
                   sum(hits) / 48, 1, 1, 0.0, "", nll, tuple(hits))


def report(model, rows, settings=SETTINGS, ppl_full=None):
    base = rows[0]
    return EvalReport(model, None, settings, ppl_full or base.ppl, base.ppl * 1.1, base.retrieval, 0.1, rows)


def test_merge_keeps_earlier_rows_and_reruns_the_requested_methods(bench):
    old = report("/old/tree/artifacts/ref-a", [row("uncompressed", None), row("snapkv", 8.0, 1.0), row("kvtc", 8.0, 0.5)])
    new = report("/new/artifacts/ref-a", [row("uncompressed", None), row("kvtc", 8.0, 0.1), row("kvtc", 24.0, 0.2)])
    merged = bench.merge_report(old, new, ["kvtc"])
    assert [(r.method, r.target_ratio) for r in merged.rows] == [
        ("uncompressed", None), ("snapkv", 8.0), ("kvtc", 8.0), ("kvtc", 24.0)]
    assert merged.rows[2].window_nll == new.rows[1].window_nll  # rerun, not kept
    assert all(r.ppl_delta_ci is not None for r in merged.rows)


def test_merge_extend_keeps_the_rerun_methods_other_ratios(bench):
    old = report("/old/artifacts/ref-a", [row("uncompressed", None), row("kvtc", 8.0, 0.5), row("kvtc", 16.0, 0.6)])
    new = report("/new/artifacts/ref-a", [row("uncompressed", None), row("kvtc", 8.0, 0.1), row("kvtc", 32.0, 0.2)])
    assert [r.target_ratio for r in bench.merge_report(old, new, ["kvtc"]).rows] == [None, 8.0, 32.0]
    merged = bench.merge_report(old, new, ["kvtc"], extend=True)
    assert [r.target_ratio for r in merged.rows] == [None, 8.0, 16.0, 32.0]
    assert merged.rows[1].window_nll == new.rows[1].window_nll  # measured now: this run's row wins
    assert merged.rows[2].window_nll == old.rows[2].window_nll


def test_merge_refuses_other_settings_or_controls(bench, tmp_path):
    old = report("/old/artifacts/ref-a", [row("uncompressed", None), row("snapkv", 8.0, 1.0)])
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"reports": [old.to_json()]}))
    assert bench.load_merge(path, SETTINGS, ["artifacts/ref-a"])["ref-a"].rows == old.rows
    with pytest.raises(DataError, match="windows 3 there, 4 here"):
        bench.load_merge(path, replace(SETTINGS, windows=4), ["artifacts/ref-a"])
    with pytest.raises(DataError, match="seed"):
        bench.load_merge(path, replace(SETTINGS, seed=1), ["artifacts/ref-a"])
    with pytest.raises(DataError, match="no report for ref-b"):
        bench.load_merge(path, SETTINGS, ["artifacts/ref-b"])
    other_model = report("/new/artifacts/ref-a", [row("uncompressed", None, 0.3), row("kvtc", 8.0, 0.5)])
    with pytest.raises(DataError, match="controls differ"):
        bench.merge_report(old, other_model, ["kvtc"])
    other_needles = report("/new/artifacts/ref-a", [row("uncompressed", None, hits=(24, 21)), row("kvtc", 8.0)])
    with pytest.raises(DataError, match="controls differ"):
        bench.merge_report(old, other_needles, ["kvtc"])


def test_artifact_methods_take_their_own_ratios(bench):
    args = bench.parse_args(["--methods", "snapkv", "kvtc", "pca", "--kvtc-ratios", "4", "24", "40"])
    assert args.windows >= 64 and args.needles >= 128
    assert bench.method_ratios(args) == {"kvtc": [4.0, 24.0, 40.0], "pca": [4.0, 24.0, 40.0]}
    assert bench.method_ratios(bench.parse_args(["--methods", "snapkv"])) == {}
