"""Ablation of codec v2, one ingredient at a time, on the bundled reference models.

Rows (each adds one ingredient to the row above):
  v1                        kvcal v1 (per-token fp16 shift/scale per group, MSE DP, zstd) — from results/rate_quality_v1.json
  + calibrated steps        per-coordinate steps fitted at calibration, nothing per token; plain MSE; K/V split; zstd
  + attention-aware metric  keys weighted by query energy, values by o_proj; K/V split; zstd
  + ANS                     calibrated symbol models, rANS (constriction); K/V split
  + joint K/V budget        one Lagrangian budget over keys and values (= codec v2, kvcal's default)

For every row and model: the CR at iso-quality (the highest measured ratio with Δppl <= 1% and needle accuracy within
one point of the full cache, on the same windows and trials as ``kvcal eval``) and the first failing ratio, plus the
bytes per section of one 767-token cache at 16x and 64x (codes, per-token side information, header, exact tokens).

    python scripts/bench_ablation.py --model artifacts/kvcal-ref-llama     # one model -> results/ablation/<name>.json
    python scripts/bench_ablation.py --report                              # merge -> results/ablation.json and .md

Each ablation artifact is calibrated into ``--work`` (default /tmp/kvcal-ablation) with the model's recipe and
``--metric``/``--budget`` overrides; the last row uses the shipped artifact (the same recipe's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvcal  # noqa: E402
from kvcal.artifact import Artifact  # noqa: E402
from kvcal.codec.kvtc import KVTCCodec  # noqa: E402
from kvcal.data import bundled_corpus, load_texts  # noqa: E402
from kvcal.eval.harness import EvalSettings, evaluate, perplexity_windows  # noqa: E402
from kvcal.eval.methods import METHODS  # noqa: E402
from kvcal.eval.methods.base import MethodContext, MethodOutput, Prefilled  # noqa: E402
from kvcal.eval.methods.transform import Kvtc  # noqa: E402
from kvcal.models import load_model  # noqa: E402


@dataclass(frozen=True)
class KvtcZstd(Kvtc):
    """KVTC with the zstd entropy stage instead of ANS (ablation only)."""

    name: ClassVar[str] = "kvtc-zstd"
    summary: ClassVar[str] = "KVTC v2 with zstd over the codes instead of ANS (ablation)"

    def apply(self, pre: Prefilled, ctx: MethodContext, ratio: float | None) -> MethodOutput:
        key = ("zstd", float(ratio))
        if key not in ctx._codecs:
            ctx._codecs[key] = KVTCCodec(ctx.artifact, float(ratio), ctx.adapter, sink=ctx.sink, window=ctx.window,
                                         entropy="zstd")
        codec = ctx._codecs[key]
        blob = codec.compress(pre.cache)
        stats = codec.stats(blob)
        return MethodOutput(codec.decompress(blob, pre.cache.layers[0].keys.device), stats["middle_bytes"],
                            stats["middle_bf16_bytes"])


METHODS[KvtcZstd.name] = KvtcZstd

ROWS = [  # (label, calibration overrides, entropy stage)
    ("+ calibrated steps", {"metric": "mse", "budget": "split"}, "zstd"),
    ("+ attention-aware metric", {"metric": "attention", "budget": "split"}, "zstd"),
    ("+ ANS", {"metric": "attention", "budget": "split"}, "ans"),
    ("+ joint K/V budget (v2)", None, "ans"),
]


def section_bytes(model, model_dir: Path, artifact_path: Path, entropy: str, ids: torch.Tensor, ratio: float) -> dict:
    codec = kvcal.load(artifact_path, ratio=ratio, model=model, entropy=entropy)
    with torch.no_grad():
        cache = model(input_ids=ids[None], use_cache=True).past_key_values
    blob = codec.compress(cache)
    stats = codec.stats(blob)
    return {"codes": stats["middle_bytes"], "side_information": 0, "header": stats["header_bytes"],
            "exact": stats["sections"]["exact"]["stored"], "total": stats["total_bytes"],
            "middle_ratio": round(stats["middle_ratio"], 2)}


def run_model(args) -> None:
    model_dir = args.model.resolve()
    model, tok = load_model(model_dir, "cpu")
    torch.set_num_threads(args.threads)
    texts = load_texts([bundled_corpus("eval")])
    settings = EvalSettings(windows=args.windows, needles=args.needles)
    ids = perplexity_windows(tok, texts, settings)[0][: settings.prefix - 1]
    out = {"model": model_dir.name, "settings": {"windows": args.windows, "needles": args.needles},
           "ratios": args.ratios, "rows": []}
    for label, overrides, entropy in ROWS:
        t0 = time.time()
        if overrides is None:
            art_path = model_dir / "kvcal"
            cal_s = 0.0
        else:
            art_path = args.work / model_dir.name / f"{overrides['metric']}-{overrides['budget']}"
            if not (art_path / "kvcal.safetensors").is_file():
                kvcal.calibrate(model_dir, out=art_path, progress=False, model=model, tokenizer=tok, **overrides)
            cal_s = time.time() - t0
        artifact = Artifact.load(art_path)
        method = "kvtc" if entropy == "ans" else "kvtc-zstd"
        if overrides is None and args.reuse:
            head = fail = None  # filled in by --report from the rate_quality.json run (which may still be running)
            rows = []
        else:
            report = evaluate(model, tok, texts, methods=["uncompressed", method], ratios=args.ratios,
                              artifact=artifact, settings=settings, progress=False, model_name=model_dir.name)
            head, fail = report.headline()[method], report.first_failing()[method]
            rows = [{"target": r.target_ratio, "measured": r.measured_ratio, "ppl_delta_pct": r.ppl_delta_pct,
                     "needle_delta": report.retrieval_delta(r)} for r in report.rows if r.method == method]
        sections = {str(int(r)): section_bytes(model, model_dir, art_path, entropy, ids, r) for r in (16.0, 64.0)}
        row = {"label": label, "calibration": overrides or {"metric": "attention", "budget": "joint"},
               "entropy": entropy, "iso_quality_ratio": head, "first_failing_ratio": fail, "curve": rows,
               "sections": sections, "calibration_seconds": round(cal_s, 1), "seconds": round(time.time() - t0, 1)}
        if overrides is None and args.reuse:
            row["reused_from"] = str(args.reuse)
        out["rows"].append(row)
        print(json.dumps({k: row[k] for k in ("label", "iso_quality_ratio", "first_failing_ratio", "seconds")}), flush=True)
    out["command"] = "python " + " ".join(sys.argv)
    dest = args.out / "ablation"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{model_dir.name}.json").write_text(json.dumps(out, indent=2) + "\n")


def reused_kvtc(path: Path, model_name: str) -> tuple[float | None, float | None, list[dict]]:
    """kvtc's headline, first failing ratio and curve for ``model_name`` from a rate_quality.json run (same
    harness, same windows and trials), so the last row is the very figure README's rate–quality table reports."""
    doc = json.loads(path.read_text())
    rep = next(r for r in doc["reports"] if Path(r["model"]).name == model_name)
    full = rep["controls"]["retrieval_full_cache"]
    rows = [{"target": r["target_ratio"], "measured": r["measured_ratio"], "ppl_delta_pct": r["ppl_delta_pct"],
             "needle_delta": None if r["retrieval"] is None or full is None else r["retrieval"] - full}
            for r in rep["rows"] if r["method"] == "kvtc"]
    head = rep["headline"]["best_ratio_by_method"]["kvtc"]
    fail = rep["headline"]["first_failing_ratio_by_method"]["kvtc"]
    return head, fail, rows


def v1_row(model_name: str, v1_path: Path, v1_artifact_commit: str) -> dict:
    """kvcal v1's headline from its saved run, and its bytes per section from its artifact's allocation."""
    import subprocess

    doc = json.loads(v1_path.read_text())
    rep = next(r for r in doc["reports"] if r["model"].endswith(model_name))
    meta = json.loads(subprocess.run(["git", "show", f"{v1_artifact_commit}:artifacts/{model_name}/kvcal/kvcal.json"],
                                     cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    widths = {"none": 0, "int2": 2, "int4": 4, "int8": 8, "fp8": 8}
    sections = {}
    for ratio in ("16", "64"):
        groups = [g for kind in ("k", "v") for g in meta["allocations"][ratio][kind]]
        total = sum(g["bits_per_token"] for g in groups)
        codes = sum(n * widths[t] for g in groups for t, n in g["coordinates"].items())
        sections[ratio] = {"bits_per_token": total, "code_bits_per_token": codes, "side_bits_per_token": total - codes}
    return {"label": "v1", "iso_quality_ratio": rep["headline"]["best_ratio_by_method"]["kvtc"],
            "first_failing_ratio": rep["headline"]["first_failing_ratio_by_method"]["kvtc"], "v1_allocation": sections}


def report(args) -> None:
    per_model = {p.stem: json.loads(p.read_text()) for p in sorted((args.out / "ablation").glob("*.json"))}
    if not per_model:
        raise SystemExit("no per-model ablation results under results/ablation/; run with --model first")
    models = list(per_model)
    for m, doc in per_model.items():
        for row in doc["rows"]:
            if row.get("reused_from"):
                row["iso_quality_ratio"], row["first_failing_ratio"], row["curve"] = reused_kvtc(Path(row["reused_from"]), m)
    v1 = {m: v1_row(m, args.v1, args.v1_commit) for m in models}
    labels = ["v1"] + [label for label, _, _ in ROWS]
    doc = {"models": per_model, "v1": v1, "command": "python " + " ".join(sys.argv)}
    (args.out / "ablation.json").write_text(json.dumps(doc, indent=2) + "\n")
    first = per_model[models[0]]
    md = [f"Codec v2 ablation: CR at iso-quality (Δppl <= 1% and needle within 1 point; {first['settings']['windows']} "
          f"windows, {first['settings']['needles']} needles; kvtc at target ratios {', '.join(f'{r:g}' for r in first['ratios'])}), "
          "then the first failing measured ratio. `python scripts/bench_ablation.py --model M` per model, then "
          "`python scripts/bench_ablation.py --report`.", "",
          "| row | " + " | ".join(f"{m}: CR at iso-quality (first failing)" for m in models) + " |",
          "|---|" + "---|" * len(models)]

    def fmt(x):
        return "none" if x is None else f"{x:.1f}x"

    for label in labels:
        cells = []
        for m in models:
            row = v1[m] if label == "v1" else next(r for r in per_model[m]["rows"] if r["label"] == label)
            cells.append(f"{fmt(row['iso_quality_ratio'])} ({fmt(row['first_failing_ratio'])})")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    reused = next((r for r in first["rows"] if r.get("reused_from")), None)
    if reused is not None:
        grid = ", ".join(f"{c['target']:g}" for c in reused["curve"])
        md += ["", f"The last row is kvtc's headline in {reused['reused_from']} (the same harness, windows and trials), "
               f"measured at target ratios {grid}; the v1 row comes from {os.path.relpath(args.v1, ROOT)}. A finer grid can move the first "
               "failing ratio one step lower than in a row measured on the coarser grid, so compare rows by their CR at "
               "iso-quality."]
    md += ["", "Bytes per section of one 767-token cache (4 sink + 635 middle + 128 window tokens), at targets 16x and 64x:", "",
           "| row | model | target | codes | side information | header | exact tokens | middle ratio |", "|---|---|---|---|---|---|---|---|"]
    for label, _, _ in ROWS:
        for m in models:
            row = next(r for r in per_model[m]["rows"] if r["label"] == label)
            for t, s in row["sections"].items():
                md.append(f"| {label} | {m} | {t}x | {s['codes']:,} | {s['side_information']} | {s['header']:,} | "
                          f"{s['exact']:,} | {s['middle_ratio']} |")
    for m in models:
        for t, a in v1[m]["v1_allocation"].items():
            md.append(f"| v1 (nominal, before zstd) | {m} | {t}x | {a['code_bits_per_token'] * 635 // 8:,} | "
                      f"{a['side_bits_per_token'] * 635 // 8:,} | – | – | – |")
    md += ["", "v1's per-token side information was an fp16 shift and scale per kept coordinate group (32 bits per group "
           "per token), part of its codes section; v2 stores none (its steps and symbol models live in the artifact)."]
    (args.out / "ablation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a reference model directory (one model per process)")
    ap.add_argument("--report", action="store_true", help="merge results/ablation/*.json into results/ablation.{json,md}")
    ap.add_argument("--ratios", type=float, nargs="+", default=[12, 16, 24, 32, 40, 48, 64, 80])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--needles", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", type=Path, default=None,
                    help="take the last row's (codec v2's) figures from this rate_quality.json instead of re-evaluating")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kvcal-ablation"))
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--v1", type=Path, default=ROOT / "results" / "rate_quality_v1.json")
    ap.add_argument("--v1-commit", default="fd44e84", help="commit whose artifacts are codec v1's")
    args = ap.parse_args()
    if args.report:
        report(args)
    elif args.model:
        run_model(args)
    else:
        ap.error("pass --model DIR or --report")


if __name__ == "__main__":
    main()
