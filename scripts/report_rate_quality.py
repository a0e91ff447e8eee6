"""README's rate–quality tables from ``results/rate_quality.json``, and the check that kvtc beats every method.

    python scripts/report_rate_quality.py                 # writes results/rate_quality_summary.{md,json}

Per model: Δppl % / needle accuracy of every method at each target ratio (the headline beside it), and the
verdict on "kvtc beats every other method at every ratio": a row of another method is beaten when kvtc has a row
at a measured ratio at least as high whose Δppl is no higher and whose needle accuracy is no lower. Two figures
closer than the measurement resolves (the 95% interval half-widths the rows report) count as a tie, which is not a
loss. Knob methods are compared at their own target ratio, fixed-rate ones against kvtc's next ratio up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def half_width(ci) -> float:
    return 0.0 if not ci else (ci[1] - ci[0]) / 2


def beaten(row: dict, kvtc_rows: list[dict], full: float) -> tuple[bool, dict | None]:
    """Whether some kvtc row at a measured ratio >= row's is no worse in ppl and needle (within resolution)."""
    candidates = [k for k in kvtc_rows if k["measured_ratio"] >= row["measured_ratio"] * (1 - 1e-3)]
    if row.get("target_ratio") is not None:
        same = [k for k in candidates if k["target_ratio"] == row["target_ratio"]]
        candidates = same or candidates
    for k in sorted(candidates, key=lambda k: k["measured_ratio"]):
        tol_ppl = max(half_width(k.get("ppl_delta_ci")), half_width(row.get("ppl_delta_ci")), 0.02)
        tol_needle = max(half_width(k.get("retrieval_delta_ci")), half_width(row.get("retrieval_delta_ci")), 0.002)
        ppl_ok = k["ppl_delta_pct"] <= row["ppl_delta_pct"] + tol_ppl
        needle_ok = row["retrieval"] is None or k["retrieval"] >= row["retrieval"] - tol_needle
        if ppl_ok and needle_ok:
            return True, k
    return False, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "rate_quality.json")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    doc = json.loads(args.results.read_text())
    md, verdicts = [], {}
    for rep in doc["reports"]:
        name = Path(rep["model"]).name
        full = rep["controls"]["retrieval_full_cache"]
        rows = rep["rows"]
        kvtc_rows = [r for r in rows if r["method"] == "kvtc"]
        targets = sorted({r["target_ratio"] for r in rows if r["target_ratio"] is not None and r["method"] != "kvtc"})
        head = rep["headline"]["best_ratio_by_method"]
        fail = rep["headline"]["first_failing_ratio_by_method"]
        md += [f"#### {name} (Δppl % / needle accuracy; full cache {full:.3f}, middle evicted "
               f"{rep['controls']['retrieval_middle_evicted']:.3f})", "",
               "| method | " + " | ".join(f"{t:g}x" for t in targets) + " | headline (first failing) |",
               "|---|" + "---:|" * (len(targets) + 1)]
        methods = list(dict.fromkeys(r["method"] for r in rows if r["target_ratio"] is not None))
        for m in methods:
            by_target = {r["target_ratio"]: r for r in rows if r["method"] == m}
            cells = [f"{by_target[t]['ppl_delta_pct']:+.2f} / {by_target[t]['retrieval']:.2f}" if t in by_target else ""
                     for t in targets]
            h = head.get(m)
            f = fail.get(m)
            md.append(f"| {m} | " + " | ".join(cells) + f" | {'none' if h is None else f'{h:.1f}x'}"
                      f" ({'none' if f is None else f'{f:.1f}x'}) |")
        kv_extra = [r for r in kvtc_rows if r["target_ratio"] not in targets]
        if kv_extra:
            md += ["", "kvtc between and beyond those ratios: " + ", ".join(
                f"{r['target_ratio']:g}x (measured {r['measured_ratio']:.1f}x) {r['ppl_delta_pct']:+.2f} / {r['retrieval']:.3f}"
                for r in sorted(kv_extra, key=lambda r: r["target_ratio"]))]
        fixed = [r for r in rows if r["target_ratio"] is None and r["method"] != "uncompressed"]
        if fixed:
            md += ["", "| fixed-rate method | measured ratio | Δppl % | needle | headline |", "|---|---:|---:|---:|---:|"]
            for r in fixed:
                h = head.get(r["method"])
                md.append(f"| {r['method']} | {r['measured_ratio']:.2f}x | {r['ppl_delta_pct']:+.2f} | "
                          f"{r['retrieval']:.3f} | {'none' if h is None else f'{h:.1f}x'} |")
        losses = []
        for r in rows:
            if r["method"] in ("kvtc", "uncompressed"):
                continue
            ok, by = beaten(r, kvtc_rows, full)
            if not ok:
                losses.append({"method": r["method"], "target_ratio": r["target_ratio"],
                               "measured_ratio": r["measured_ratio"], "ppl_delta_pct": r["ppl_delta_pct"],
                               "retrieval": r["retrieval"]})
        verdicts[name] = {"kvtc_headline": head.get("kvtc"), "kvtc_first_failing": fail.get("kvtc"),
                          "rows_compared": sum(1 for r in rows if r["method"] not in ("kvtc", "uncompressed")),
                          "rows_not_beaten": losses}
        md += ["", f"kvtc beats {verdicts[name]['rows_compared'] - len(losses)} of {verdicts[name]['rows_compared']} "
               "rows of other methods" + (": not beaten: " + ", ".join(
                   f"{x['method']} at {x['measured_ratio']:.1f}x" for x in losses) if losses else " (all)."), ""]
    (args.out / "rate_quality_summary.md").write_text("\n".join(md) + "\n")
    (args.out / "rate_quality_summary.json").write_text(json.dumps(
        {"source": str(args.results.relative_to(ROOT) if args.results.is_relative_to(ROOT) else args.results),
         "command": "python " + " ".join(sys.argv), "verdicts": verdicts}, indent=2) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
