"""Rate–quality benchmark: KVTC against every baseline on the bundled reference models.

For each model, KVTC runs at every artifact ratio and each baseline with a knob at the same target ratios
(fixed-rate baselines report their own ratio); every method is scored on the same perplexity windows and
needle trials (``kvcal.eval.harness``). Writes ``results/rate_quality.json`` (every figure),
``results/rate_quality.md`` (tables) and ``results/rate_quality.png`` (curves, one column per model).

    python scripts/bench_rate_quality.py                       # both reference models, defaults below
    python scripts/bench_rate_quality.py --windows 4 --needles 8  # quicker

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
from kvcal.eval.harness import (  # noqa: E402
    MAX_PPL_DELTA_PCT,
    MAX_RETRIEVAL_DROP,
    EvalReport,
    EvalSettings,
    evaluate,
    plot_rate_quality,
)
from kvcal.eval.methods import method_names  # noqa: E402
from kvcal.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("artifacts/kvcal-ref-llama", "artifacts/kvcal-ref-qwen3")
DEFAULT_RATIOS = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model directories")
    p.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    p.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    p.add_argument("--windows", type=int, default=32, help="perplexity windows per model")
    p.add_argument("--needles", type=int, default=64, help="needle-probe trials per model")
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
    return p.parse_args()


def artifact_with_ratios(model_dir: Path, ratios: list[float], model, tokenizer, progress: bool) -> tuple[Artifact, float]:
    """The model's artifact, calibrated first (with the model's recipe and ``ratios``) if it lacks any of them."""
    path = model_dir / "kvcal" / ARTIFACT_FILE
    if path.is_file():
        artifact = Artifact.load(model_dir)
        have = {ratio_key(r) for r in artifact.ratios}
        if all(ratio_key(r) in have for r in ratios):
            return artifact, 0.0
    import kvcal

    t0 = time.perf_counter()
    print(f"calibrating {model_dir} at ratios {', '.join(ratio_key(r) for r in ratios)}", flush=True)
    kvcal.calibrate(model_dir, ratios=tuple(ratios), model=model, tokenizer=tokenizer, progress=progress)
    return Artifact.load(model_dir), time.perf_counter() - t0


def markdown(reports: list[EvalReport], seconds: dict[str, float], args: argparse.Namespace) -> str:
    s = reports[0].settings
    lines = [
        "# Rate–quality of KV-cache methods on the kvcal reference models",
        "",
        f"Perplexity: {s.windows} windows of {s.prefix} prefix + {s.continuation} continuation tokens from the eval "
        f"corpus, teacher-forced through each method's cache. Retrieval: needle probe, {s.needles} trials of "
        f"{s.needle_context} tokens (32 random-word tokens planted mid-context, 24 scored). Sink {s.sink} and window "
        f"{s.window} tokens stay exact under every method; ratios are bf16 bytes / stored bytes of the middle tokens, "
        "every stored byte counted (eviction: kept tokens at bf16). "
        f"Device {args.device}, {args.threads} thread(s), torch {torch.__version__}.",
        "",
        f"Headline: highest measured ratio with perplexity within {MAX_PPL_DELTA_PCT:g}% of the full cache and needle "
        f"accuracy within {MAX_RETRIEVAL_DROP:g} of it.",
    ]
    for report in reports:
        lines += [
            "",
            f"## {Path(report.model).name}",
            "",
            f"Controls: perplexity full cache {report.ppl_uncompressed:.3f}, middle evicted {report.ppl_evicted:.3f}; "
            f"needle accuracy full cache {report.retrieval_full:.3f}, middle evicted {report.retrieval_evicted:.3f}. "
            f"Evaluation time {seconds[report.model]:.0f} s.",
            "",
            "| method | target ratio | measured ratio | ppl | Δppl % | needle acc. | note |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in report.rows:
            lines.append(
                f"| {r.method} | {'-' if r.target_ratio is None else f'{r.target_ratio:g}'} | {r.measured_ratio:.2f} | "
                f"{r.ppl:.3f} | {r.ppl_delta_pct:+.2f} | {r.retrieval:.3f} | {r.detail} |"
            )
        lines += ["", "| method | headline ratio |", "|---|---:|"]
        for method, ratio in report.headline().items():
            lines.append(f"| {method} | {'none' if ratio is None else f'{ratio:.2f}x'} |")
        if report.control_warning():
            lines += ["", f"**{report.control_warning()[0].upper()}{report.control_warning()[1:]}.**"]
    return "\n".join(lines) + "\n"


def evaluate_model(name: str, args: argparse.Namespace) -> tuple[EvalReport, float, float]:
    """One model's report, evaluation seconds and calibration seconds; runs in a worker process."""
    torch.set_num_threads(args.threads)
    settings = EvalSettings(prefix=args.prefix, continuation=args.continuation, sink=args.sink, window=args.window,
                            windows=args.windows, needles=args.needles, needle_context=args.needle_context).validate()
    texts = load_texts([bundled_corpus("eval")])
    model_dir = (ROOT / name) if not Path(name).is_absolute() else Path(name)
    model, tokenizer = load_model(model_dir, args.device)
    artifact, calib_seconds = artifact_with_ratios(model_dir, args.ratios, model, tokenizer, args.progress)
    t0 = time.perf_counter()
    report = evaluate(model, tokenizer, texts, methods=args.methods, ratios=args.ratios, artifact=artifact,
                      settings=settings, progress=args.progress, model_name=str(model_dir))
    seconds = time.perf_counter() - t0
    print(report.table(), flush=True)
    print(f"({seconds:.0f} s)\n", flush=True)
    return report, seconds, calib_seconds


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
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

    doc = {
        "command": " ".join(sys.argv),
        "environment": {"torch": torch.__version__, "threads": args.threads, "jobs": args.jobs, "device": args.device,
                        "python": platform.python_version(), "machine": platform.machine()},
        "eval_seconds": eval_seconds,
        "calibration_seconds": calib_seconds,
        "reports": [r.to_json() for r in reports],
    }
    (args.out / "rate_quality.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "rate_quality.md").write_text(markdown(reports, eval_seconds, args))
    plot_rate_quality(reports, args.out / "rate_quality.png")
    print(f"wrote {args.out / 'rate_quality.json'}, {args.out / 'rate_quality.md'}, {args.out / 'rate_quality.png'}")


if __name__ == "__main__":
    main()
