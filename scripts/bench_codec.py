"""Codec speed, zstd level choice and KVTCCache memory, on a reference model (CPU, or CUDA when present).

    python scripts/bench_codec.py                       # bundled kvcal-ref-llama, 2048 tokens
    python scripts/bench_codec.py --model artifacts/kvcal-ref-qwen3 --tokens 2048 --batch 2

Writes ``results/bench_codec.json`` and ``results/bench_codec.md``. Throughput is in MB/s of the bf16 size
of the whole cache (what a serving stack would move); times are medians of ``--repeats`` runs.
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
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvcal  # noqa: E402
from kvcal.cache import KVTCCache, dynamic_cache_bytes  # noqa: E402
from kvcal.data import bundled_corpus, bundled_model, load_texts, token_stream  # noqa: E402
from kvcal.models import load_model  # noqa: E402


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=bundled_model())
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ratios", type=float, nargs="*", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--generate", type=int, default=512, help="new tokens for the KVTCCache memory measurement")
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
    art_ratios = kvcal.load(args.model, model=model).artifact.ratios
    ratios = args.ratios or art_ratios
    rows = []
    for ratio in ratios:
        codec = kvcal.load(args.model, ratio=ratio, model=model)
        comp_s, blob = timed(lambda: codec.compress(cache), args.repeats, sync)
        decomp_s, _ = timed(lambda: codec.decompress(blob, device=device), args.repeats, sync)
        stats = codec.stats(blob)
        # zstd's share: time spent compressing/decompressing the raw sections alone.
        geo, sections = codec.parse(blob)
        raw = list(sections.values())
        zc = zstandard.ZstdCompressor(level=codec.zstd_level)
        frames = [zc.compress(r) for r in raw]
        zd = zstandard.ZstdDecompressor()
        zstd_c, _ = timed(lambda: [zc.compress(r) for r in raw], args.repeats, sync)
        zstd_d, _ = timed(lambda: [zd.decompress(f) for f in frames], args.repeats, sync)
        rows.append({
            "ratio": ratio, "middle_ratio": round(stats["middle_ratio"], 2), "whole_ratio": round(stats["whole_ratio"], 2),
            "blob_bytes": len(blob), "compress_ms": round(comp_s * 1e3, 1), "decompress_ms": round(decomp_s * 1e3, 1),
            "compress_MBps": round(mb / comp_s, 1), "decompress_MBps": round(mb / decomp_s, 1),
            "zstd_share_compress": round(zstd_c / comp_s, 3), "zstd_share_decompress": round(zstd_d / decomp_s, 3),
        })
        print(json.dumps(rows[-1]), flush=True)

    # zstd level: ratio and time of the whole blob at each level, for the middle ratio the DP targets most.
    codec = kvcal.load(args.model, ratio=ratios[len(ratios) // 2], model=model)
    levels = []
    for level in (1, 3, 6, 9, 19):
        codec.zstd_level = level
        t, blob = timed(lambda: codec.compress(cache), args.repeats, sync)
        levels.append({"level": level, "middle_ratio": round(codec.stats(blob)["middle_ratio"], 3), "compress_ms": round(t * 1e3, 1)})
        print(json.dumps(levels[-1]), flush=True)

    # KVTCCache: resident bytes after a long generation, against DynamicCache for the same tokens.
    mem = []
    gen_ids = ids[:1, : min(args.tokens, 512)]
    for ratio in ratios:
        codec = kvcal.load(args.model, ratio=ratio, model=model)
        kc = KVTCCache(codec, block=64, config=model.config)
        with torch.no_grad():
            t = time.perf_counter()
            model.generate(gen_ids, attention_mask=torch.ones_like(gen_ids), max_new_tokens=args.generate,
                           min_new_tokens=args.generate, do_sample=False, past_key_values=kc)
            gen_s = time.perf_counter() - t
            dyn = model(input_ids=torch.zeros(1, kc.get_seq_length(), dtype=torch.long, device=device), use_cache=True).past_key_values
        mem.append({"ratio": ratio, "tokens": kc.get_seq_length(), "kvtc_cache_bytes": kc.resident_bytes(),
                    "dynamic_cache_bytes": dynamic_cache_bytes(dyn),
                    "saving": round(dynamic_cache_bytes(dyn) / kc.resident_bytes(), 2),
                    "tokens_per_s": round(args.generate / gen_s, 1)})
        print(json.dumps(mem[-1]), flush=True)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(gen_ids, attention_mask=torch.ones_like(gen_ids), max_new_tokens=args.generate,
                       min_new_tokens=args.generate, do_sample=False)
    dyn_tps = args.generate / (time.perf_counter() - t)

    result = {
        "model": str(args.model), "device": str(device), "dtype": str(next(model.parameters()).dtype),
        "tokens": args.tokens, "batch": args.batch, "cache_bf16_MB": round(mb, 3), "prefill_ms": round(prefill_s * 1e3, 1),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "codec": rows, "zstd_levels": levels, "kvtc_cache_memory": mem, "dynamic_cache_tokens_per_s": round(dyn_tps, 1),
        "command": "python " + " ".join(sys.argv),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_codec.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"Codec on `{args.model.name}`, {args.batch} x {args.tokens} tokens ({mb:.2f} MB bf16), {device}, "
          f"{torch.get_num_threads()} threads; prefill (recompute) {prefill_s * 1e3:.0f} ms. `{result['command']}`", "",
          "| ratio | measured middle ratio | whole-cache ratio | compress ms | decompress ms | compress MB/s | decompress MB/s | zstd share (c/d) |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['ratio']:g} | {r['middle_ratio']} | {r['whole_ratio']} | {r['compress_ms']} | {r['decompress_ms']} | "
           f"{r['compress_MBps']} | {r['decompress_MBps']} | {r['zstd_share_compress']:.0%} / {r['zstd_share_decompress']:.0%} |" for r in rows]
    md += ["", "| zstd level | middle ratio | compress ms |", "|---|---|---|"]
    md += [f"| {lv['level']} | {lv['middle_ratio']} | {lv['compress_ms']} |" for lv in levels]
    md += ["", f"KVTCCache after generating {args.generate} tokens (DynamicCache generates at {dyn_tps:.1f} tok/s):", "",
           "| ratio | tokens | KVTCCache bytes | DynamicCache bytes | saving | tok/s |", "|---|---|---|---|---|---|"]
    md += [f"| {m['ratio']:g} | {m['tokens']} | {m['kvtc_cache_bytes']:,} | {m['dynamic_cache_bytes']:,} | {m['saving']}x | {m['tokens_per_s']} |" for m in mem]
    (args.out_dir / "bench_codec.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
