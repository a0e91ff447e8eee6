"""Rate–quality benchmark: KVTC against every baseline on the bundled reference models.

For each model, KVTC runs at every artifact ratio and each baseline with a knob at the same target ratios
(fixed-rate baselines report their own ratio); every method is scored on the same perplexity windows and
needle trials (``kvcal.eval.harness``). Writes ``results/rate_quality.json`` (every figure),
``results/rate_quality.md`` (tables) and ``results/rate_quality.png`` (curves, one column per model).

    python scripts/bench_rate_quality.py                       # both reference models, defaults below
    python scripts/bench_rate_quality.py --windows 4 --needles 8  # quicker
    # baselines measured once, KVTC later on a denser grid, merged into one file:
    python scripts/bench_rate_quality.py --methods kvtc --kvtc-ratios 4 8 16 24 32 48 64 96 128 \
        --merge results/rate_quality_baselines.json

Every Δ carries a 95% paired-bootstrap interval (over windows for perplexity, over trials for the needle probe).
``--merge PATH`` keeps the rows of an earlier results JSON (same settings, same controls, else it refuses) and
(re)runs only ``--methods``; with ``--extend`` it also keeps those methods' earlier rows at target ratios this run
does not measure (to add ratios to a curve measured with the same code, e.g. ``--methods kvtc --kvtc-ratios 144
--merge results/rate_quality.json --extend``). ``--v1 PATH`` (default ``results/rate_quality_v1.json`` if present) draws codec v1's
KVTC from a saved run as an extra curve, ``kvtc-v1``.

A model whose artifact lacks one of ``--ratios`` is (re)calibrated first with those ratios (that time is
reported separately and is not part of the evaluation time).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvcal.artifact import ARTIFACT_FILE, Artifact, ratio_key  # noqa: E402
from kvcal.data import bundled_corpus, load_texts  # noqa: E402
from kvcal.errors import DataError  # noqa: E402
from kvcal.eval.harness import (  # noqa: E402
    MAX_PPL_DELTA_PCT,
    MAX_RETRIEVAL_DROP,
    EvalReport,
    EvalRow,
    EvalSettings,
    evaluate,
    fmt_ci,
    plot_rate_quality,
)
from kvcal.eval.methods import method_names  # noqa: E402
from kvcal.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("artifacts/kvcal-ref-llama", "artifacts/kvcal-ref-qwen3")
DEFAULT_RATIOS = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
# Methods whose ratios come from the calibration artifact: they take --kvtc-ratios when given.
ARTIFACT_METHODS = ("kvtc", "pca", "kvtc+pyramidkv")
# Controls of a merged run and of this one must agree this closely (relative, perplexity) to be combined.
CONTROL_RTOL = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model directories")
    p.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS), help="target ratios of the baselines")
    p.add_argument("--kvtc-ratios", "--artifact-ratios", dest="artifact_ratios", nargs="+", type=float, default=None,
                   help=f"target ratios of the artifact methods ({', '.join(ARTIFACT_METHODS)}; default: --ratios)")
    p.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    p.add_argument("--windows", type=int, default=64, help="perplexity windows per model")
    p.add_argument("--needles", type=int, default=128, help="needle-probe trials per model")
    p.add_argument("--prefix", type=int, default=768)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--needle-context", type=int, default=1024)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per model (the bench machine has 2 cores)")
    p.add_argument("--jobs", type=int, default=2, help="models evaluated at once, one process each")
    p.add_argument("--out", type=Path, default=ROOT / "results", help="output directory")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--merge", type=Path, default=None,
                   help="results JSON of an earlier run with the same settings: keep its rows, (re)run only --methods")
    p.add_argument("--extend", action="store_true",
                   help="with --merge: also keep the rerun methods' earlier rows at target ratios not measured now")
    p.add_argument("--v1", type=Path, default=ROOT / "results" / "rate_quality_v1.json",
                   help="results JSON whose kvtc rows are drawn as 'kvtc-v1' (skipped if absent)")
    return p.parse_args(argv)


def artifact_with_ratios(model_dir: Path, ratios: list[float], model, tokenizer, progress: bool) -> tuple[Artifact | None, float]:
    """The model's artifact, calibrated first (with the model's recipe, its present ratios and ``ratios``) if it
    lacks any of them: a present artifact's ratios are kept, never narrowed to this run's."""
    path = model_dir / "kvcal" / ARTIFACT_FILE
    if not ratios and not path.is_file():
        return None, 0.0
    if path.is_file():
        artifact = Artifact.load(model_dir)
        have = {ratio_key(r) for r in artifact.ratios}
        if all(ratio_key(r) in have for r in ratios):
            return artifact, 0.0
        ratios = sorted({*artifact.ratios, *ratios})
    import kvcal

    t0 = time.perf_counter()
    print(f"calibrating {model_dir} at ratios {', '.join(ratio_key(r) for r in ratios)}", flush=True)
    kvcal.calibrate(model_dir, ratios=tuple(ratios), model=model, tokenizer=tokenizer, progress=progress)
    return Artifact.load(model_dir), time.perf_counter() - t0


def settings_from(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(prefix=args.prefix, continuation=args.continuation, sink=args.sink, window=args.window,
                        windows=args.windows, needles=args.needles, needle_context=args.needle_context).validate()


def method_ratios(args: argparse.Namespace) -> dict[str, list[float]]:
    if not args.artifact_ratios:
        return {}
    return {m: list(args.artifact_ratios) for m in ARTIFACT_METHODS if m in args.methods}


def load_merge(path: Path, settings: EvalSettings, models: list[str]) -> dict[str, EvalReport]:
    """The earlier run's reports by model directory name; refuses one whose settings differ from ``settings`` or
    that lacks one of ``models``."""
    try:
        doc = json.loads(path.read_text())
        reports = {Path(r["model"]).name: EvalReport.from_json(r) for r in doc["reports"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--merge {path}: not a rate_quality results file ({e})") from None
    for name in models:
        old = reports.get(Path(name).name)
        if old is None:
            raise DataError(f"--merge {path} has no report for {Path(name).name}; it holds {', '.join(reports)}")
        if old.settings != settings:
            diff = ", ".join(f"{k} {getattr(old.settings, k)} there, {getattr(settings, k)} here"
                             for k in settings.__dataclass_fields__ if getattr(old.settings, k) != getattr(settings, k))
            raise DataError(f"--merge {path}: {Path(name).name} was measured with other settings ({diff}); refusing to merge")
    return reports


def merge_report(old: EvalReport, new: EvalReport, rerun: list[str], extend: bool = False) -> EvalReport:
    """``new`` with the rows of ``old`` for every method not in ``rerun`` (and, with ``extend``, the rows of rerun
    methods at target ratios ``new`` lacks); refuses when the settings or the controls (full cache and
    middle-evicted perplexity and needle accuracy, per window and per trial) differ."""
    name = Path(new.model).name
    if old.settings != new.settings:
        raise DataError(f"{name}: the merged run used other settings; refusing to merge")
    old_base = next((r for r in old.rows if r.method == "uncompressed"), None)
    new_base = next(r for r in new.rows if r.method == "uncompressed")

    def close(a, b) -> bool:
        return (a is None) == (b is None) and (a is None or abs(a - b) <= CONTROL_RTOL * max(abs(a), abs(b), 1e-12))

    same = (old_base is not None and len(old_base.window_nll) == len(new_base.window_nll)
            and all(close(a, b) for a, b in zip(old_base.window_nll, new_base.window_nll))
            and tuple(old_base.trial_hits) == tuple(new_base.trial_hits)
            and all(close(getattr(old, k), getattr(new, k))
                    for k in ("ppl_uncompressed", "ppl_evicted", "retrieval_full", "retrieval_evicted")))
    if not same:
        raise DataError(f"{name}: the merged run's controls differ from this run's (full cache ppl "
                        f"{old.ppl_uncompressed} there, {new.ppl_uncompressed} here; needle {old.retrieval_full} there, "
                        f"{new.retrieval_full} here): not the same model, data or code path; refusing to merge")
    order = {m: i for i, m in enumerate(method_names())}
    measured = {(r.method, r.target_ratio) for r in new.rows}
    kept = [r for r in old.rows if r.method != "uncompressed"
            and (r.method not in rerun or (extend and (r.method, r.target_ratio) not in measured))]
    rows = sorted([*new.rows, *kept], key=lambda r: (order.get(r.method, len(order)), r.target_ratio or 0))
    return EvalReport(new.model, new.artifact, new.settings, new.ppl_uncompressed, new.ppl_evicted, new.retrieval_full,
                      new.retrieval_evicted, rows).with_intervals()


def v1_rows(path: Path) -> dict[str, list[EvalRow]]:
    """Codec v1's kvtc rows from a saved run, renamed ``kvtc-v1``, by model directory name ({} if absent)."""
    if not path or not path.is_file():
        return {}
    from dataclasses import replace

    out = {}
    for doc in json.loads(path.read_text())["reports"]:
        out[Path(doc["model"]).name] = [replace(r, method="kvtc-v1") for r in EvalReport.from_json(doc).rows
                                        if r.method == "kvtc"]
    return out


def markdown(reports: list[EvalReport], seconds: dict[str, float], args: argparse.Namespace,
             merged_from: dict[str, str] | None = None) -> str:
    s = reports[0].settings
    lines = [
        "# Rate–quality of KV-cache methods on the kvcal reference models",
        "",
        f"Perplexity: {s.windows} windows of {s.prefix} prefix + {s.continuation} continuation tokens from the eval "
        f"corpus, teacher-forced through each method's cache. Retrieval: needle probe, {s.needles} trials of "
        f"{s.needle_context} tokens (32 random-word tokens planted mid-context, 24 scored; one point of needle "
        f"accuracy is {s.needle_point_tokens:g} tokens). Sink {s.sink} and window "
        f"{s.window} tokens stay exact under every method; ratios are bf16 bytes / stored bytes of the middle tokens, "
        "every stored byte counted (eviction: kept tokens at bf16). "
        f"Device {args.device}, {args.threads} thread(s), torch {torch.__version__}.",
        "",
        f"Headline: highest measured ratio with perplexity within {MAX_PPL_DELTA_PCT:g}% of the full cache and needle "
        f"accuracy within {MAX_RETRIEVAL_DROP:g} of it (point estimates); beside it, the lowest measured ratio that "
        "fails that bar. Intervals: 95% paired bootstrap over windows (Δppl) and over trials (Δneedle, the "
        f"difference from the full cache's accuracy), seed {s.seed}.",
    ]
    for report in reports:
        lines += [
            "",
            f"## {Path(report.model).name}",
            "",
            f"Measured in: {merged_from.get(Path(report.model).name, 'this run')}." if merged_from else "",
            "",
            f"Controls: perplexity full cache {report.ppl_uncompressed:.3f}, middle evicted {report.ppl_evicted:.3f}; "
            f"needle accuracy full cache {report.retrieval_full:.3f}, middle evicted {report.retrieval_evicted:.3f}. "
            f"Evaluation time {seconds.get(report.model, 0.0):.0f} s.",
            "",
            "| method | target ratio | measured ratio | ppl | Δppl % [95% CI] | needle acc. | Δneedle [95% CI] | note |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in report.rows:
            d = report.retrieval_delta(r)
            lines.append(
                f"| {r.method} | {'-' if r.target_ratio is None else f'{r.target_ratio:g}'} | {r.measured_ratio:.2f} | "
                f"{r.ppl:.3f} | {r.ppl_delta_pct:+.2f} {fmt_ci(r.ppl_delta_ci, '+.2f')} | {r.retrieval:.3f} | "
                f"{'-' if d is None else f'{d:+.3f}'} {fmt_ci(r.retrieval_delta_ci, '+.3f')} | {r.detail} |"
            )
        failing = report.first_failing()
        lines += ["", "| method | headline ratio | first failing ratio |", "|---|---:|---:|"]
        for method, ratio in report.headline().items():
            lines.append(f"| {method} | {'none' if ratio is None else f'{ratio:.2f}x'} | "
                         f"{'none' if failing[method] is None else f'{failing[method]:.2f}x'} |")
        if report.control_warning():
            lines += ["", f"**{report.control_warning()[0].upper()}{report.control_warning()[1:]}.**"]
    return "\n".join(lines) + "\n"


def evaluate_model(name: str, args: argparse.Namespace) -> tuple[EvalReport, float, float]:
    """One model's report, evaluation seconds and calibration seconds; runs in a worker process."""
    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    texts = load_texts([bundled_corpus("eval")])
    model_dir = (ROOT / name) if not Path(name).is_absolute() else Path(name)
    model, tokenizer = load_model(model_dir, args.device)
    # The artifact methods need their ratios calibrated; pyramidkv reads only the artifact's per-layer weights.
    needs_artifact = any(m in args.methods for m in ARTIFACT_METHODS)
    ratios = (args.artifact_ratios or args.ratios) if needs_artifact else []
    artifact, calib_seconds = (artifact_with_ratios(model_dir, ratios, model, tokenizer, args.progress)
                               if needs_artifact or "pyramidkv" in args.methods else (None, 0.0))
    t0 = time.perf_counter()
    report = evaluate(model, tokenizer, texts, methods=args.methods, ratios=args.ratios, artifact=artifact,
                      settings=settings, progress=args.progress, model_name=str(model_dir),
                      method_ratios=method_ratios(args))
    seconds = time.perf_counter() - t0
    print(report.table(), flush=True)
    print(f"({seconds:.0f} s)\n", flush=True)
    return report, seconds, calib_seconds


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # Refuse a mismatched --merge before any work.
    old = load_merge(args.merge, settings_from(args), args.models) if args.merge else {}
    if args.jobs > 1:
        # Models are independent: one process each (spawned, so each sets its own torch threads).
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(args.models)), mp_context=mp.get_context("spawn")) as pool:
            done = list(pool.map(evaluate_model, args.models, [args] * len(args.models)))
    else:
        done = [evaluate_model(name, args) for name in args.models]
    reports = [report for report, _, _ in done]
    eval_seconds = {r.model: s for r, (_, s, _) in zip(reports, done)}
    calib_seconds = {r.model: c for r, (_, _, c) in zip(reports, done)}
    merged_from = {}
    if old:
        reports = [merge_report(old[Path(r.model).name], r, args.methods, args.extend) for r in reports]
        now = f"{', '.join(args.methods)} in this run"
        if args.extend:
            now += (f" at target ratios {', '.join(ratio_key(x) for x in args.artifact_ratios)}"
                    if args.artifact_ratios else " at this run's ratios")
        merged_from = {Path(r.model).name: f"{now}, every other row from {args.merge}" for r in reports}

    doc = {
        "command": " ".join(sys.argv),
        "environment": {"torch": torch.__version__, "threads": args.threads, "jobs": args.jobs, "device": args.device,
                        "python": platform.python_version(), "machine": platform.machine()},
        "eval_seconds": eval_seconds,
        "calibration_seconds": calib_seconds,
        "merged_from": str(args.merge) if args.merge else None,
        "reports": [r.to_json() for r in reports],
    }
    (args.out / "rate_quality.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "rate_quality.md").write_text(markdown(reports, eval_seconds, args, merged_from))
    plot_rate_quality(reports, args.out / "rate_quality.png", v1_rows(args.v1))
    print(f"wrote {args.out / 'rate_quality.json'}, {args.out / 'rate_quality.md'}, {args.out / 'rate_quality.png'}")


if __name__ == "__main__":
    main()
