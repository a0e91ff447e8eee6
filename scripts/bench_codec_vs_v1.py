"""Codec v2 against codec v1 on the CPU, interleaved so that both see the same machine.

    python scripts/bench_codec_vs_v1.py                    # v1 = commit 159d3db, 8 rounds, ratios 16 and 64
    python scripts/bench_codec_vs_v1.py --rounds 12 --ratios 16 64 --tokens 2048

On a shared host the speed of a core drifts by 30% and more within minutes, so two benchmarks run one after the
other compare the host as much as the codecs. This one checks v1 out into a temporary git worktree (its own code and
its own artifacts), then alternates: one process of v1, one of v2, ``--rounds`` times. Each process prefills the
bundled kvcal-ref-llama on the same ``--tokens`` of the eval corpus and times ``--repeats`` compressions and
decompressions per ratio. Reported per codec and ratio: the minimum over every run (the cost with the least
interference: the figure compared) and the median of the per-round minima (its spread). Writes
``results/bench_codec_vs_v1.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
V1_COMMIT = "159d3db"  # the last commit of codec v1 (format 1, zstd over bit-packed codes)

WORKER = r"""
import json, sys, time
root, tokens, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ratios = [float(r) for r in sys.argv[5].split(",")]
dtypes = sys.argv[6].split(",")
sys.path.insert(0, root)
import torch
torch.set_num_threads(threads)
import kvcal
from kvcal.data import bundled_corpus, load_texts, token_stream
from kvcal.models import load_model
model_dir = f"{root}/artifacts/kvcal-ref-llama"
model, tok = load_model(model_dir, "cpu")
ids = token_stream(tok, load_texts([bundled_corpus("eval")]))[:tokens][None]
with torch.no_grad():
    cache = model(input_ids=ids, use_cache=True).past_key_values
out = {}
for dtype in dtypes:
    kv = [(layer.keys.to(getattr(torch, dtype)), layer.values.to(getattr(torch, dtype))) for layer in cache.layers]
    for ratio in ratios:
        codec = kvcal.load(model_dir, ratio=ratio, model=model)
        blob = codec.compress(kv)
        codec.decompress(blob)  # warm-up: tables, compiled kernels, thread pool
        comp, decomp = [], []
        for _ in range(repeats):
            t = time.perf_counter(); codec.compress(kv); comp.append(time.perf_counter() - t)
            t = time.perf_counter(); codec.decompress(blob); decomp.append(time.perf_counter() - t)
        out[f"{dtype}/{ratio}"] = {"compress_s": min(comp), "decompress_s": min(decomp), "blob_bytes": len(blob)}
print("RESULT " + json.dumps(out))
"""


def run_worker(root: Path, args) -> dict:
    cmd = [sys.executable, "-c", WORKER, str(root), str(args.tokens), str(args.repeats), str(args.threads),
           ",".join(str(r) for r in args.ratios), ",".join(args.dtypes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"bench_codec_vs_v1: the worker for {root} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--v1-commit", default=V1_COMMIT)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratios", type=float, nargs="+", default=[16.0, 64.0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"],
                    help="cache dtypes (the reference models run in float32; serving caches are mostly bf16)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvcal-v1-") as tmp:
        v1 = Path(tmp) / "v1"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(v1), args.v1_commit], check=True)
        try:
            runs: dict[str, list[dict]] = {"v1": [], "v2": []}
            t0 = time.time()
            for i in range(args.rounds):
                for name, root in (("v1", v1), ("v2", ROOT)) if i % 2 == 0 else (("v2", ROOT), ("v1", v1)):
                    runs[name].append(run_worker(root, args))
                print(f"round {i + 1}/{args.rounds} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(v1)], check=False)

    rows = []
    for dtype, ratio in [(d, r) for d in args.dtypes for r in args.ratios]:
        key = f"{dtype}/{ratio}"
        row = {"dtype": dtype, "ratio": ratio}
        for name in ("v1", "v2"):
            for what in ("compress", "decompress"):
                per_round = [r[key][f"{what}_s"] * 1e3 for r in runs[name]]
                row[f"{name}_{what}_ms_min"] = round(min(per_round), 2)
                row[f"{name}_{what}_ms_median"] = round(statistics.median(per_round), 2)
            row[f"{name}_blob_bytes"] = runs[name][0][key]["blob_bytes"]
        for what in ("compress", "decompress"):
            row[f"{what}_v2_over_v1"] = round(row[f"v2_{what}_ms_min"] / row[f"v1_{what}_ms_min"], 3)
        rows.append(row)
    result = {"command": "python " + " ".join(sys.argv), "v1_commit": args.v1_commit, "rounds": args.rounds,
              "dtypes": args.dtypes,
              "repeats": args.repeats, "tokens": args.tokens, "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "rows": rows, "runs": runs}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_codec_vs_v1.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"Codec v2 (this tree) against v1 (commit {args.v1_commit}) on kvcal-ref-llama, 1 x {args.tokens} tokens, "
          f"CPU, {args.threads} threads; {args.rounds} alternating rounds of one process each, {args.repeats} "
          f"compressions and decompressions per ratio per process. `{result['command']}`", "",
          "| cache dtype | ratio | compress ms v1 | compress ms v2 | v2 / v1 | decompress ms v1 | decompress ms v2 | v2 / v1 |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['dtype']} | {r['ratio']:g} | {r['v1_compress_ms_min']} ({r['v1_compress_ms_median']}) | "
                  f"{r['v2_compress_ms_min']} ({r['v2_compress_ms_median']}) | {r['compress_v2_over_v1']} | "
                  f"{r['v1_decompress_ms_min']} ({r['v1_decompress_ms_median']}) | "
                  f"{r['v2_decompress_ms_min']} ({r['v2_decompress_ms_median']}) | {r['decompress_v2_over_v1']} |")
    md += ["", "Minimum over every run, with the median of the per-round minima in brackets; v2 / v1 compares the "
           "minima. Blob sizes differ because the two codecs store different bits (v1 spends them on per-token "
           "scales, v2 on more coordinates)."]
    (args.out_dir / "bench_codec_vs_v1.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
