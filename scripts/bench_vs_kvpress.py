"""kvpress side by side: kvpress's own presses in kvcal's rate–quality harness, on the bundled reference models.

kvpress (NVIDIA, on PyPI) pins an older transformers than kvcal, so it runs in a virtual environment this script
creates (``--venv``, default ``.kvpress-venv/``; kvpress is never a dependency of kvcal). The script

1. builds, with kvcal's harness, the same perplexity windows and needle trials that ``bench_rate_quality.py``
   scores (same settings, same seed) and hands their token ids to a worker inside that environment;
2. the worker prefills each context under a kvpress press (StreamingLLM, SnapKV, PyramidKV, Knorm, at the memory
   of kvcal's eviction baselines: sink + window + middle / ratio tokens per layer) or into transformers'
   ``QuantizedCache`` (optimum-quanto, 4 and 2 bits, kvpress's quantized cache), then teacher-forces the
   continuation through that cache at true positions, exactly as kvcal's harness does, and counts the bytes kept;
3. reads kvcal's own numbers from ``results/rate_quality.json`` (per-window NLLs and per-trial hits, so the two
   can be compared pair by pair), checks that both environments compute the same uncompressed model, and writes
   ``results/bench_vs_kvpress.{json,md,png}``: the merged rate–quality table, the agreement check of kvcal's
   StreamingLLM/SnapKV/PyramidKV against kvpress's (paired bootstrap over windows and trials), and each method's
   highest ratio within 1% perplexity and 1 point of needle accuracy.

    python scripts/bench_rate_quality.py        # kvcal's side (writes results/rate_quality.json)
    python scripts/bench_vs_kvpress.py          # kvpress's side, the comparison, the table and the plot

Byte accounting: a press keeps whole tokens, billed at bf16 like kvcal's eviction baselines; the tokens it keeps
beyond the sink + window allowance count against the middle, so equal kept tokens means an equal measured ratio.
The quantized cache quantizes every prefilled token (sink and window too, as kvpress uses it): its ratio is over
the whole prefill, codes as packed plus a bf16 scale and shift per 64-value group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KVPRESS_VERSION = "0.5.5"
QUANTO_VERSION = "0.2.7"
PRESSES = ("streamingllm", "snapkv", "pyramidkv", "knorm", "snapkv-matched")
QUANT_BITS = (4, 2)
# kvcal's baselines that kvpress also implements: the agreement check pairs them.
PAIRED = [("streamingllm", "kvpress-streamingllm"), ("snapkv", "kvpress-snapkv"), ("snapkv", "kvpress-snapkv-matched"),
          ("pyramidkv", "kvpress-pyramidkv")]
BOOTSTRAP = 2000


# --- worker: runs inside the kvpress environment ----------------------------------------------------------------
def run_worker(job_path: Path, out_path: Path) -> None:
    from dataclasses import dataclass

    import kvpress
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, DynamicCache, QuantizedCache
    from transformers.utils import logging as hf_logging

    # kvcal's teacher-forced step needs only torch and transformers, so the worker scores with the very code
    # kvcal's harness uses (kvcal's other dependencies are not installed in this environment).
    sys.path.insert(0, str(ROOT))
    from kvcal.eval.scoring import continue_from

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    job = torch.load(job_path, weights_only=False)
    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, local_files_only=True).eval()
    cfg = model.config
    layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    token_bytes = layers * heads * 2 * head_dim * 2  # bf16 keys + values of one token, every layer
    sink, window = job["sink"], job["window"]
    @dataclass
    class MatchedSnapKV(kvpress.SnapKVPress):
        """kvpress's SnapKV (its hook, its window attention) with kvcal's settings: the last ``obs`` queries score
        the tokens, scores summed over the query heads of a KV head, max-pooled (``kernel``) over the middle only,
        and the first ``sink`` and last ``recent`` tokens always kept. Agreeing with kvcal's ``snapkv`` shows that the
        two implement the same rule; any gap to kvpress's own SnapKV is then its parameters."""

        sink: int = 4
        recent: int = 128
        obs: int = 32
        kernel: int = 7

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            b, kv_heads, n, _ = keys.shape
            attn = self.compute_window_attention(module, hidden_states, keys, self.obs, kwargs["position_embeddings"])
            per_head = attn.sum(2).view(b, kv_heads, -1, n - self.obs).sum(2)
            middle = per_head[..., self.sink : n - self.recent]
            pooled = F.max_pool1d(middle.reshape(b * kv_heads, 1, -1), self.kernel, stride=1, padding=self.kernel // 2)
            scores = torch.full((b, kv_heads, n), float(pooled.max()) + 1.0, dtype=pooled.dtype, device=pooled.device)
            scores[..., self.sink : n - self.recent] = pooled.reshape(b, kv_heads, -1)
            return scores

    press_classes = {"streamingllm": kvpress.StreamingLLMPress, "snapkv": kvpress.SnapKVPress,
                     "pyramidkv": kvpress.PyramidKVPress, "knorm": kvpress.KnormPress,
                     "snapkv-matched": lambda compression_ratio: MatchedSnapKV(
                         compression_ratio=compression_ratio, sink=sink, recent=window, obs=job["obs_window"],
                         kernel=job["pool_kernel"])}

    def kept_target(n: int, ratio: float) -> int:
        middle = n - sink - window
        return sink + window + min(middle, round(middle / ratio))

    def quantized_bytes(cache) -> int:
        total = 0
        for layer in cache.layers:
            for q in (layer._quantized_keys, layer._quantized_values):
                total += q._data._data.numel() * q._data._data.element_size() + q._scale.numel() * 2 * 2
        return total

    @torch.no_grad()
    def run(run_cfg: dict, context: torch.Tensor, feed: torch.Tensor, targets: torch.Tensor) -> dict:
        n = context.numel() - 1  # the last context token is fed after the cache is made, as in kvcal's harness
        press = None
        if run_cfg["kind"] == "quantized":
            cache = QuantizedCache(backend="quanto", config=cfg, nbits=run_cfg["bits"], q_group_size=64,
                                   residual_length=window)
        else:
            cache = DynamicCache()
            if run_cfg["kind"] == "press":
                cr = 1.0 - (kept_target(n, run_cfg["ratio"]) + 0.25) / n
                press = press_classes[run_cfg["press"]](compression_ratio=cr)
        if press is not None:
            with press(model):
                model(input_ids=context[None, :-1], past_key_values=cache, use_cache=True)
        else:
            model(input_ids=context[None, :-1], past_key_values=cache, use_cache=True)
        if run_cfg["kind"] == "quantized":
            lengths = [n] * layers
            stored, bf16 = quantized_bytes(cache), n * token_bytes
        else:
            lengths = [layer.keys.shape[2] for layer in cache.layers]
            exact = (sink + window) * token_bytes
            stored = sum(lengths) * heads * 2 * head_dim * 2 - exact
            bf16 = (n - sink - window) * token_bytes
        if len(set(lengths)) == 1:
            logits = continue_from(model, cache, feed[None], n)[0]
        else:
            # Layers of different lengths (PyramidKV) need a mask per layer; one token at a time needs none.
            logits = torch.cat([continue_from(model, cache, feed[None, i : i + 1], n + i)[0] for i in range(feed.numel())])
        return {"nll": float(F.cross_entropy(logits, targets, reduction="sum")),
                "hits": int((logits.argmax(-1) == targets).sum()), "stored": stored, "bf16": bf16, "lengths": lengths}

    rows = []
    for run_cfg in job["runs"]:
        t0 = time.perf_counter()
        row = {**run_cfg, "window_nll": [], "trial_hits": [], "stored_bytes": 0, "bf16_bytes": 0,
               "kept_per_layer_window": None, "kept_per_layer_needle": None}
        for ids in job["windows"]:
            context, continuation = ids[: job["prefix"]], ids[job["prefix"] :]
            r = run(run_cfg, context, torch.cat([context[-1:], continuation[:-1]]), continuation)
            row["window_nll"].append(round(r["nll"], 5))
            row["stored_bytes"] += r["stored"]
            row["bf16_bytes"] += r["bf16"]
            row["kept_per_layer_window"] = r["lengths"]
        for context, target in job["trials"]:
            r = run(run_cfg, context, torch.cat([context[-1:], target[:-1]]), target)
            row["trial_hits"].append(r["hits"])
            row["stored_bytes"] += r["stored"]
            row["bf16_bytes"] += r["bf16"]
            row["kept_per_layer_needle"] = r["lengths"]
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        at = '' if run_cfg['ratio'] is None else f"@{run_cfg['ratio']:g}"
        print(f"kvpress worker ({Path(job['model']).name}): {run_cfg['name']}{at} in {row['seconds']:.0f} s", flush=True)
    out_path.write_text(json.dumps({"model": job["model"], "rows": rows, "versions": package_versions()}, indent=1))


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("kvpress", "transformers", "torch", "optimum-quanto", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


# --- the kvpress environment -------------------------------------------------------------------------------
def ensure_venv(venv: Path) -> Path:
    """The environment's python, after creating it and installing kvpress there if it is not yet."""
    from kvcal.eval.peer_env import ensure_peer_venv

    return ensure_peer_venv(venv, "import kvpress, optimum.quanto; from importlib.metadata import version; "
                            f"assert version('kvpress') == '{KVPRESS_VERSION}'",
                            [f"kvpress=={KVPRESS_VERSION}", f"optimum-quanto=={QUANTO_VERSION}"], f"kvpress {KVPRESS_VERSION}")


# --- kvcal's side ------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, type=Path, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--ours", type=Path, default=ROOT / "results" / "rate_quality.json",
                   help="kvcal's rate-quality results (scripts/bench_rate_quality.py) to compare with")
    p.add_argument("--ratios", nargs="+", type=float, default=[4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
    p.add_argument("--venv", type=Path, default=ROOT / ".kvpress-venv")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--parallel", type=int, default=2, help="models evaluated at once (one worker each)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--redraw", action="store_true", help="rewrite the .md and .png from OUT/bench_vs_kvpress.json only")
    return p.parse_args()


def planned_runs(ratios: list[float]) -> list[dict]:
    runs = [{"name": "kvpress-none", "kind": "none", "ratio": None}]
    for press in PRESSES:
        runs += [{"name": f"kvpress-{press}", "kind": "press", "press": press, "ratio": r} for r in ratios]
    runs += [{"name": f"kvpress-quanto{b}", "kind": "quantized", "bits": b, "ratio": None} for b in QUANT_BITS]
    return runs


def write_job(report, ratios: list[float], threads: int, work: Path) -> Path:
    """The worker's input: the exact token ids kvcal's harness scored for ``report``."""
    import torch
    from transformers import AutoTokenizer

    from kvcal.data import bundled_corpus, load_texts
    from kvcal.eval.harness import needle_trials, perplexity_windows
    from kvcal.eval.methods.eviction import SnapKV

    s = report.settings
    tokenizer = AutoTokenizer.from_pretrained(report.model, local_files_only=True)
    texts = load_texts([bundled_corpus("eval")])
    windows = perplexity_windows(tokenizer, texts, s)
    trials = needle_trials(tokenizer, texts, s)
    job = {"model": str(Path(report.model).resolve()), "prefix": s.prefix, "sink": s.sink, "window": s.window,
           "obs_window": s.obs_window, "pool_kernel": SnapKV().pool_kernel,
           "threads": threads, "windows": list(windows), "trials": [(t.context, t.target) for t in trials],
           "runs": planned_runs(ratios)}
    path = work / f"{Path(report.model).name}.job.pt"
    torch.save(job, path)
    return path


def kvpress_rows(worker_out: dict, report, tokens_per_window: int, needle_tokens: int) -> list:
    from kvcal.eval.harness import EvalRow

    base = next(r for r in report.rows if r.method == "uncompressed")
    base_nll = sum(base.window_nll)
    rows = []
    for r in worker_out["rows"]:
        if r["kind"] == "none":
            continue
        nll = sum(r["window_nll"])
        ppl = math.exp(nll / (tokens_per_window * len(r["window_nll"])))
        hits = sum(r["trial_hits"])
        rows.append(EvalRow(r["name"], r["ratio"], r["bf16_bytes"] / r["stored_bytes"], ppl,
                            100.0 * (math.exp((nll - base_nll) / (tokens_per_window * len(r["window_nll"]))) - 1.0),
                            hits / (needle_tokens * len(r["trial_hits"])), r["stored_bytes"], r["bf16_bytes"],
                            r["seconds"], kept_detail(r), tuple(r["window_nll"]), tuple(r["trial_hits"])))
    return rows


def kept_detail(r: dict) -> str:
    if r["kind"] == "quantized":
        return "whole prefill quantized (sink and window too)"
    kept = r["kept_per_layer_needle"]
    return "kept per layer (needle): " + ("/".join(map(str, kept)) if len(set(kept)) > 1 else f"{kept[0]} each")


def paired_bootstrap(ours, theirs, base_nll, tokens_per_window: int, needle_tokens: int, seed: int = 0) -> dict:
    """Differences ours - kvpress in Δppl % (against the full cache) and in needle accuracy, with 95% intervals
    from resampling windows and trials in pairs (``kvcal.eval.intervals``)."""
    from kvcal.eval.intervals import accuracy_delta_interval, ppl_delta_interval

    # Δppl % of ours against kvpress's is 100 * (exp(sum(nll_ours - nll_theirs) / tokens) - 1): the same statistic
    # as a method's Δppl % against the full cache.
    p = ppl_delta_interval(ours.window_nll, theirs.window_nll, tokens_per_window, seed, BOOTSTRAP)
    a = accuracy_delta_interval(ours.trial_hits, theirs.trial_hits, needle_tokens, seed, BOOTSTRAP)
    ppl = {"diff": p.estimate, "ci95": [p.low, p.high]}
    acc = {"diff": a.estimate, "ci95": [a.low, a.high]}
    # The noise floor: how precisely the harness measures either method's own effect (half the 95% interval of its
    # Δppl against the full cache, of its needle accuracy). Two implementations agree within noise when their
    # difference's interval holds 0 or the difference is below that floor.
    ppl["noise"] = max(ppl_delta_interval(r.window_nll, base_nll, tokens_per_window, seed, BOOTSTRAP).half_width
                       for r in (ours, theirs))
    acc["noise"] = max(accuracy_delta_interval(r.trial_hits, None, needle_tokens, seed, BOOTSTRAP).half_width
                       for r in (ours, theirs))
    for d in (ppl, acc):
        d["agree"] = d["ci95"][0] <= 0.0 <= d["ci95"][1] or abs(d["diff"]) <= d["noise"]
    return {"ppl_pct": ppl, "needle": acc}


def agreement(report, tokens_per_window: int, needle_tokens: int) -> list[dict]:
    by_key = {(r.method, r.target_ratio): r for r in report.rows}
    base = by_key[("uncompressed", None)]
    out = []
    for ours_name, theirs_name in PAIRED:
        for (method, ratio), ours in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            if method != ours_name or (theirs_name, ratio) not in by_key:
                continue
            theirs = by_key[(theirs_name, ratio)]
            out.append({"method": ours_name, "kvpress": theirs_name, "target_ratio": ratio, "ours_ratio": ours.measured_ratio,
                        "kvpress_ratio": theirs.measured_ratio, "ours_ppl_delta_pct": ours.ppl_delta_pct,
                        "kvpress_ppl_delta_pct": theirs.ppl_delta_pct, "ours_needle": ours.retrieval,
                        "kvpress_needle": theirs.retrieval,
                        **paired_bootstrap(ours, theirs, base.window_nll, tokens_per_window, needle_tokens)})
    return out


def markdown(merged: list, checks: dict, sanity: dict, versions: dict, command: str) -> str:
    from kvcal.eval.harness import MAX_PPL_DELTA_PCT, MAX_RETRIEVAL_DROP

    s = merged[0].settings
    lines = [
        "# kvcal against kvpress, in one harness",
        "",
        f"`{command}`; kvpress environment: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        f"Perplexity: {s.windows} windows of {s.prefix} + {s.continuation} tokens; needle probe: {s.needles} trials of "
        f"{s.needle_context} tokens; the same token ids on both sides. kvpress's presses keep sink + window + middle / "
        "ratio tokens per layer on average (kvcal's eviction memory); their measured ratio counts every kept token "
        "beyond the sink + window allowance against the middle. kvpress's quantized cache (`kvpress-quanto4/2`, "
        "transformers' `QuantizedCache` with optimum-quanto, group 64) quantizes the whole prefill; its ratio is over "
        "the whole prefill.",
    ]
    lines += summary(merged)
    for report in merged:
        name = Path(report.model).name
        lines += ["", f"## {name}", "",
                  f"Uncompressed perplexity: kvcal {report.ppl_uncompressed:.4f}, kvpress environment "
                  f"{sanity[name]['kvpress_ppl']:.4f} (transformers {versions.get('transformers')}); needle accuracy "
                  f"full {report.retrieval_full:.3f}, middle evicted {report.retrieval_evicted:.3f}.",
                  "", "| method | target | measured ratio | Δppl % | needle acc. | note |", "|---|---:|---:|---:|---:|---|"]
        for r in sorted(report.rows, key=lambda r: (r.method, r.target_ratio or 0)):
            lines.append(f"| {r.method} | {'-' if r.target_ratio is None else f'{r.target_ratio:g}'} | "
                         f"{r.measured_ratio:.2f} | {r.ppl_delta_pct:+.2f} | {r.retrieval:.3f} | {r.detail} |")
        lines += ["", f"Highest measured ratio with Δppl <= {MAX_PPL_DELTA_PCT:g}% and needle accuracy within "
                  f"{MAX_RETRIEVAL_DROP:g} of the full cache:", "", "| method | headline ratio |", "|---|---:|"]
        for method, ratio in sorted(report.headline().items(), key=lambda kv: -(kv[1] or 0)):
            lines.append(f"| {method} | {'none' if ratio is None else f'{ratio:.2f}x'} |")
        lines += ["", "Agreement of kvcal's baselines with kvpress's (ours - kvpress; paired bootstrap 95% interval "
                  "over windows / trials). They agree within noise when the interval holds 0 or the difference is "
                  "below the noise floor (half the 95% interval with which the harness measures either method's own "
                  "effect, shown after ±):", "",
                  "| kvcal vs kvpress | target | ratio ours / kvpress | Δppl % ours / kvpress | diff [95% CI] | needle ours / kvpress "
                  "| diff [95% CI] | agree within noise |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for c in checks[name]:
            p, a = c["ppl_pct"], c["needle"]
            lines.append(
                f"| {c['method']} vs {c['kvpress']} | {c['target_ratio']:g} | {c['ours_ratio']:.2f} / {c['kvpress_ratio']:.2f} | "
                f"{c['ours_ppl_delta_pct']:+.2f} / {c['kvpress_ppl_delta_pct']:+.2f} | {p['diff']:+.2f} "
                f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] ±{p['noise']:.2f} | {c['ours_needle']:.3f} / "
                f"{c['kvpress_needle']:.3f} | {a['diff']:+.3f} [{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}] ±{a['noise']:.3f} | "
                f"{'yes' if p['agree'] and a['agree'] else 'no'} |")
    return "\n".join(lines) + "\n"


def summary(merged: list) -> list[str]:
    """The README's tables: per model, Δppl % / needle accuracy of every method at each target ratio, the fixed-rate
    methods at the ratio they reach, and each method's headline ratio."""
    lines = []
    for report in merged:
        ratios = sorted({r.target_ratio for r in report.rows if r.target_ratio is not None})
        by_method: dict[str, dict] = {}
        for r in report.rows:
            by_method.setdefault(r.method, {})[r.target_ratio] = r
        best = report.headline()
        lines += ["", f"### Summary: {Path(report.model).name} (Δppl % / needle accuracy; full cache "
                  f"{report.retrieval_full:.3f}, middle evicted {report.retrieval_evicted:.3f})", "",
                  "| method | " + " | ".join(f"{r:g}x" for r in ratios) + " | headline |",
                  "|---|" + "---:|" * (len(ratios) + 1)]
        for method, rows in by_method.items():
            if None in rows:
                continue
            cells = [f"{rows[r].ppl_delta_pct:+.2f} / {rows[r].retrieval:.2f}" if r in rows else "-" for r in ratios]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_ratio(best.get(method))} |")
        lines += ["", "| fixed-rate method | measured ratio | Δppl % | needle | headline |", "|---|---:|---:|---:|---:|"]
        for method, rows in by_method.items():
            if None in rows and method != "uncompressed":
                r = rows[None]
                lines.append(f"| {method} | {r.measured_ratio:.2f}x | {r.ppl_delta_pct:+.2f} | {r.retrieval:.3f} | "
                             f"{_ratio(best.get(method))} |")
    return lines


def _ratio(x: float | None) -> str:
    return "none" if x is None else f"{x:.1f}x"


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(*args.worker)
        return
    sys.path.insert(0, str(ROOT))
    from kvcal.eval.harness import EvalReport, plot_rate_quality
    from kvcal.eval.retrieval import NeedleProbe

    if args.redraw:
        doc = json.loads((args.out / "bench_vs_kvpress.json").read_text())
        merged = [EvalReport.from_json(d) for d in doc["reports"]]
        (args.out / "bench_vs_kvpress.md").write_text(
            markdown(merged, doc["agreement"], doc["sanity_uncompressed_ppl"], doc["kvpress_environment"], doc["command"]))
        plot_rate_quality(merged, args.out / "bench_vs_kvpress.png")
        return
    if not args.ours.is_file():
        raise SystemExit(f"{args.ours} not found; run `python scripts/bench_rate_quality.py` first")
    ours_doc = json.loads(args.ours.read_text())
    reports = [EvalReport.from_json(d) for d in ours_doc["reports"]]
    if any(not r.rows[0].window_nll for r in reports):
        raise SystemExit(f"{args.ours} has no per-window figures (written by an older kvcal); rerun "
                         "`python scripts/bench_rate_quality.py`")
    py = ensure_venv(args.venv)
    work = args.out / "tmp" / "kvpress"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": ""}
    outs, pending = {}, []
    t0 = time.perf_counter()
    for report in reports:
        job = write_job(report, args.ratios, args.threads, work)
        out = work / f"{Path(report.model).name}.out.json"
        outs[report.model] = out
        pending.append(subprocess.Popen([str(py), __file__, "--worker", str(job), str(out)], env=env))
        while sum(p.poll() is None for p in pending) >= args.parallel:
            time.sleep(1)
    if any(p.wait() != 0 for p in pending):
        raise SystemExit("a kvpress worker failed (its error is printed above)")
    seconds = time.perf_counter() - t0

    merged, checks, sanity, versions = [], {}, {}, {}
    for report in reports:
        s = report.settings
        worker_out = json.loads(outs[report.model].read_text())
        versions = worker_out["versions"]
        none = next(r for r in worker_out["rows"] if r["kind"] == "none")
        base = next(r for r in report.rows if r.method == "uncompressed")
        # Both sides must be scoring the same model on the same tokens before their methods can be compared.
        kvp_ppl = math.exp(sum(none["window_nll"]) / (s.continuation * len(none["window_nll"])))
        if abs(kvp_ppl / report.ppl_uncompressed - 1) > 1e-3 or none["trial_hits"] != list(base.trial_hits):
            raise SystemExit(f"{report.model}: the kvpress environment's uncompressed model gives perplexity {kvp_ppl:.4f} "
                             f"against kvcal's {report.ppl_uncompressed:.4f}; was {args.ours} made with these weights?")
        probe = NeedleProbe()
        needle_tokens = probe.needle_len - probe.prompt_len  # scored tokens per trial, as the harness builds them
        rows = kvpress_rows(worker_out, report, s.continuation, needle_tokens)
        report.rows.extend(rows)
        name = Path(report.model).name
        sanity[name] = {"kvpress_ppl": kvp_ppl, "kvcal_ppl": report.ppl_uncompressed}
        checks[name] = agreement(report, s.continuation, needle_tokens)
        merged.append(report)

    command = " ".join(["python", "scripts/bench_vs_kvpress.py", *sys.argv[1:]])
    doc = {"command": command, "kvpress_environment": versions, "kvpress_seconds": round(seconds, 1),
           "sanity_uncompressed_ppl": sanity, "agreement": checks, "reports": [r.to_json() for r in merged]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_vs_kvpress.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "bench_vs_kvpress.md").write_text(markdown(merged, checks, sanity, versions, command))
    plot_rate_quality(merged, args.out / "bench_vs_kvpress.png")
    print((args.out / "bench_vs_kvpress.md").read_text())


if __name__ == "__main__":
    main()
