"""Codec speed per stage, entropy stage choice and KVTCCache memory, on a reference model (CPU, or CUDA when present).

    python scripts/bench_codec.py                       # bundled kvcal-ref-llama, 2048 tokens, ratios 16 and 64
    python scripts/bench_codec.py --model artifacts/kvcal-ref-qwen3 --tokens 2048 --batch 2 --ratios 8 16 32 64

Writes ``results/bench_codec.json`` and ``results/bench_codec.md``. Throughput is in MB/s of the bf16 size of the
whole cache (what a serving stack would move). A shared host's speed drifts by tens of percent within minutes, so
the configurations (ratio x entropy stage) are timed round-robin, one compression and one decompression each per
round for ``--repeats`` rounds, and the figure reported is each one's fastest run (the median is in the JSON);
stage times are the fastest of ``--repeats`` as well. Each run is also split
into its stages, timed separately on the same data: the transform's projection matmuls (rows -> coordinates on
the way in, coordinates -> rows on the way out) against everything else (RoPE undo/redo, gathering rows,
quantizing, the entropy stage, the container). ``non-matmul / matmul`` is the issue's speed figure (goal <= 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvcal  # noqa: E402
from kvcal.cache import KVTCCache, dynamic_cache_bytes  # noqa: E402
from kvcal.codec.kvtc import KINDS, cache_tensors  # noqa: E402
from kvcal.codec.transform import centred_middle_rows  # noqa: E402
from kvcal.data import bundled_corpus, bundled_model, load_texts, token_stream  # noqa: E402
from kvcal.models import load_model  # noqa: E402


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    """The fastest of ``repeats`` runs of ``fn`` (seconds) and its last result."""
    times, out = [], None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times), out


def stage_times(codec, cache, repeats: int, sync) -> dict[str, float]:
    """Seconds per stage of one compress and one decompress, each stage timed alone on the same data."""
    kv, sliding = cache_tensors(cache)
    geo = codec.geometry(kv, None, sliding, None)
    keys = [(kind, g) for kind in KINDS for g in range(len(codec.groups))]
    proj = {key: codec.placed(*key, kv[0][0].device)[0] for key in keys}

    def gather(key):  # as compress does it: gathered, un-rotated, centred and checked finite in one pass
        return centred_middle_rows(kv, geo, codec.adapter, key[0], codec.groups[key[1]], codec.group_rotary_dim(*key),
                                   proj[key].mean)[0]

    rows = {key: gather(key) for key in keys}
    coords = {key: proj[key].project_centred(rows[key]) for key in keys}
    codes = {key: codec.quantizers[key].quantize(coords[key]).numpy() for key in keys}
    payload = {key: codec.stage.encode(codes[key], codec.quantizers[key].models) for key in keys}
    n = rows[keys[0]].shape[0]
    L = codec.layout

    def decode_matmuls():  # as scatter_middle does it: one product per group, the mean inside it
        for key in keys:
            torch.addmm(proj[key].mean, coords[key], proj[key].decoder)

    out = {
        "gather_rows": timed(lambda: [gather(key) for key in keys], repeats, sync)[0],
        "project_matmul": timed(lambda: [proj[key].project_centred(rows[key]) for key in keys], repeats, sync)[0],
        "quantize": timed(lambda: [codec.quantizers[key].quantize(coords[key]) for key in keys], repeats, sync)[0],
        "entropy_encode": timed(lambda: [codec.stage.encode(codes[key], codec.quantizers[key].models) for key in keys],
                                repeats, sync)[0],
        "entropy_decode": timed(lambda: [codec.stage.decode(payload[key], n, codec.quantizers[key].models) for key in keys],
                                repeats, sync)[0],
        "reconstruct_matmul": timed(decode_matmuls, repeats, sync)[0],
    }
    out["layers"] = L.num_layers
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=bundled_model())
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ratios", type=float, nargs="*", default=[16.0, 64.0])
    ap.add_argument("--entropy", nargs="*", default=["rans", "ans", "zstd"], help="entropy stages to time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--generate", type=int, default=384, help="new tokens for the KVTCCache memory measurement (0: skip)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, args.device)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stream = token_stream(tok, load_texts([bundled_corpus("eval")]))
    ids = torch.stack([stream[i * args.tokens : (i + 1) * args.tokens] for i in range(args.batch)]).to(device)
    with torch.no_grad():
        prefill_s, out = timed(lambda: model(input_ids=ids, use_cache=True), 1, sync)
    cache = out.past_key_values
    bf16_bytes = sum(t.numel() * 2 for lay in cache.layers for t in (lay.keys, lay.values))
    mb = bf16_bytes / 1e6
    configs = [(ratio, entropy) for ratio in args.ratios for entropy in args.entropy]
    codecs, blobs = {}, {}
    for key in configs:
        codecs[key] = kvcal.load(args.model, ratio=key[0], model=model, entropy=key[1])
        blobs[key] = codecs[key].compress(cache)  # warm-up: symbol tables, RoPE tables, compiled kernels
        codecs[key].decompress(blobs[key], device=device)
    runs = {key: {"compress": [], "decompress": []} for key in configs}
    for _ in range(args.repeats):  # round-robin: every configuration sees the same stretch of the host's speed
        for key in configs:
            codec = codecs[key]
            runs[key]["compress"].append(timed(lambda: codec.compress(cache), 1, sync)[0])  # noqa: B023
            runs[key]["decompress"].append(timed(lambda: codec.decompress(blobs[key], device=device), 1, sync)[0])  # noqa: B023
    rows = []
    for key in configs:
        ratio, entropy = key
        codec, blob = codecs[key], blobs[key]
        comp_s, decomp_s = min(runs[key]["compress"]), min(runs[key]["decompress"])
        stats = codec.stats(blob)
        st = stage_times(codec, cache, args.repeats, sync)
        row = {
            "ratio": ratio, "entropy": entropy, "middle_ratio": round(stats["middle_ratio"], 2),
            "whole_ratio": round(stats["whole_ratio"], 2), "blob_bytes": len(blob),
            "compress_ms": round(comp_s * 1e3, 2), "decompress_ms": round(decomp_s * 1e3, 2),
            "compress_ms_median": round(statistics.median(runs[key]["compress"]) * 1e3, 2),
            "decompress_ms_median": round(statistics.median(runs[key]["decompress"]) * 1e3, 2),
            "compress_MBps": round(mb / comp_s, 1), "decompress_MBps": round(mb / decomp_s, 1),
            "stages_ms": {k: round(v * 1e3, 2) for k, v in st.items() if k != "layers"},
            "non_matmul_over_matmul_compress": round((comp_s - st["project_matmul"]) / st["project_matmul"], 2),
            "non_matmul_over_matmul_decompress": round((decomp_s - st["reconstruct_matmul"]) / st["reconstruct_matmul"], 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    mem = []
    dyn_tps = None
    if args.generate:
        gen_ids = ids[:1, : min(args.tokens, 512)]
        for ratio in args.ratios:
            codec = kvcal.load(args.model, ratio=ratio, model=model)
            kc = KVTCCache(codec, block=64, config=model.config)
            with torch.no_grad():
                t = time.perf_counter()
                model.generate(gen_ids, attention_mask=torch.ones_like(gen_ids), max_new_tokens=args.generate,
                               min_new_tokens=args.generate, do_sample=False, past_key_values=kc)
                gen_s = time.perf_counter() - t
                dyn = model(input_ids=torch.zeros(1, kc.get_seq_length(), dtype=torch.long, device=device),
                            use_cache=True).past_key_values
            mem.append({"ratio": ratio, "tokens": kc.get_seq_length(), "kvtc_cache_bytes": kc.resident_bytes(),
                        "dynamic_cache_bytes": dynamic_cache_bytes(dyn),
                        "saving": round(dynamic_cache_bytes(dyn) / kc.resident_bytes(), 2),
                        "tokens_per_s": round(args.generate / gen_s, 1)})
            print(json.dumps(mem[-1]), flush=True)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(gen_ids, attention_mask=torch.ones_like(gen_ids), max_new_tokens=args.generate,
                           min_new_tokens=args.generate, do_sample=False)
        dyn_tps = round(args.generate / (time.perf_counter() - t), 1)

    result = {
        "model": str(args.model), "device": str(device), "dtype": str(next(model.parameters()).dtype),
        "tokens": args.tokens, "batch": args.batch, "cache_bf16_MB": round(mb, 3), "prefill_ms": round(prefill_s * 1e3, 1),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "codec": rows, "kvtc_cache_memory": mem, "dynamic_cache_tokens_per_s": dyn_tps,
        "command": "python " + " ".join(sys.argv),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_codec.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"Codec on `{args.model.name}`, {args.batch} x {args.tokens} tokens ({mb:.2f} MB bf16), {device}, "
          f"{torch.get_num_threads()} threads; prefill (recompute) {prefill_s * 1e3:.0f} ms; fastest of {args.repeats} "
          f"round-robin runs (medians in the JSON). `{result['command']}`", "",
          "| ratio | entropy | measured middle ratio | whole-cache ratio | compress ms | decompress ms | compress MB/s | "
          "decompress MB/s | non-matmul / matmul (c / d) |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['ratio']:g} | {r['entropy']} | {r['middle_ratio']} | {r['whole_ratio']} | {r['compress_ms']} | "
           f"{r['decompress_ms']} | {r['compress_MBps']} | {r['decompress_MBps']} | "
           f"{r['non_matmul_over_matmul_compress']} / {r['non_matmul_over_matmul_decompress']} |" for r in rows]
    stage_names = list(rows[0]["stages_ms"]) if rows else []
    md += ["", "Stages, each timed alone on the same data (ms):", "",
           "| ratio | entropy | " + " | ".join(stage_names) + " |", "|---|---|" + "---|" * len(stage_names)]
    md += [f"| {r['ratio']:g} | {r['entropy']} | " + " | ".join(str(r["stages_ms"][s]) for s in stage_names) + " |"
           for r in rows]
    if mem:
        md += ["", f"KVTCCache after generating {args.generate} tokens (DynamicCache generates at {dyn_tps} tok/s):", "",
               "| ratio | tokens | KVTCCache bytes | DynamicCache bytes | saving | tok/s |", "|---|---|---|---|---|---|"]
        md += [f"| {m['ratio']:g} | {m['tokens']} | {m['kvtc_cache_bytes']:,} | {m['dynamic_cache_bytes']:,} | "
               f"{m['saving']}x | {m['tokens_per_s']} |" for m in mem]
    (args.out_dir / "bench_codec.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
