"""GPU benchmark of issue 12 at the shapes of Llama-3.1-8B and Mistral-NeMo-12B (random weights of the real configs).

    python scripts/bench_gpu.py                          # on a CUDA machine: writes results/bench_gpu.{json,md}
    python scripts/bench_gpu.py --cpu-smoke              # tiny shapes on the CPU, < 1 min: /tmp/kvcal-bench-gpu-smoke/
    python scripts/bench_gpu.py --overhead-only          # the artifact-overhead arithmetic alone (exact, any machine)

Measures, each against its goal:
- **restore vs recompute** at ``--tokens`` x ``--batch`` (8K x 8): ``codec.decompress(blob)`` into a cache on the
  GPU against a prefill of the same tokens that builds the same cache (goal >= 10x);
- **throughput** of ``compress`` and ``decompress`` in GB/s of the bf16 KV cache at ratios 16 and 64 (goal >= 100),
  with the device part (kernels or torch transform) and the host part (entropy stage) split out;
- **calibration** wall time and peak GPU memory at the 12B shape with ``--calib-tokens`` (1M; goal < 2 min);
- **overhead**: the artifact's stored parameters as a share of the model's (goal <= 2.4%): exact arithmetic from
  the artifact's tensor shapes (``kvcal.calibration.overhead_parameters``), for each grouping and rank, plus the
  share of the artifacts this run calibrated;
- **generate()** with ``KVTCCache`` against ``DynamicCache``: tokens/s and peak memory.

Timings: ``--warmup`` untimed runs, then ``--repeats`` timed ones (CUDA events on a GPU, ``perf_counter`` on the
CPU); median, min, max. Results are written after every measurement, so a run cut short keeps what it measured.
Without CUDA the script refuses to run except as ``--cpu-smoke`` (tiny shapes, labelled as such, written outside
``results/``) or ``--overhead-only``: it never writes a GPU figure it did not measure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvcal  # noqa: E402
from kvcal.cache import KVTCCache, dynamic_cache_bytes  # noqa: E402
from kvcal.calibration import overhead_parameters, pca_groups  # noqa: E402
from kvcal.codec import kernels  # noqa: E402
from kvcal.codec.kvtc import KINDS, cache_tensors  # noqa: E402
from kvcal.codec.transform import middle_rows, scatter_middle  # noqa: E402

KERNELS = "auto"  # --kernels: the codec's kernels mode
GOALS = {"restore_over_recompute": 10.0, "throughput_GBps": 100.0, "calibration_s": 120.0, "overhead_percent": 2.4}

# The real configs (Hugging Face config.json values of meta-llama/Llama-3.1-8B and mistralai/Mistral-Nemo-Base-2407).
SHAPES = {
    "llama-3.1-8b": dict(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "mistral-nemo-12b": dict(
        family="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1024000,
        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
}
# --cpu-smoke: the same families and RoPE, tiny (the bundled tokenizer's ids stay below 4096).
SMOKE_SIZES = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=0, eos_token_id=0)


def config_for(name: str, smoke: bool):
    import transformers as tf

    fields = dict(SHAPES[name])
    family = fields.pop("family")
    if smoke:
        fields.update(SMOKE_SIZES)
        if "original_max_position_embeddings" in fields["rope_parameters"]:
            fields["rope_parameters"] = {**fields["rope_parameters"], "original_max_position_embeddings": 256}
    cls = tf.LlamaConfig if family == "llama" else tf.MistralConfig
    return cls(**fields)


def model_parameters(config) -> int:
    """Exact parameter count of the model a config makes (built on the meta device: nothing is allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def overhead_rows(name: str, config, ranks: list[int]) -> list[dict]:
    """The artifact's overhead for each grouping and basis rank, from the tensor shapes ``calibrate`` stores."""
    params = model_parameters(config)
    layers, heads, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    rows = []
    for grouping in ("per-layer", "cross-layer"):
        groups = pca_groups(tuple(range(layers)), grouping)
        p = len(groups[0]) * heads * d
        for rank in sorted({min(r, p) for r in ranks} | {p}):
            with torch.device("meta"):
                tensors = {}
                for kind in KINDS:
                    for g, group in enumerate(groups):
                        blocks = len(group) * heads
                        tensors[f"{kind}.{g}.mean"] = torch.empty(p)
                        tensors[f"{kind}.{g}.basis"] = torch.empty(p, rank)
                        tensors[f"{kind}.{g}.weight"] = torch.empty(blocks, d, d)
                        tensors[f"{kind}.{g}.weight_inverse"] = torch.empty(blocks, d, d)
            stored = overhead_parameters(tensors)
            pct = 100.0 * stored / params
            rows.append({"shape": name, "model_parameters": params, "grouping": grouping, "basis_dim": p,
                         "rank": rank, "stored_parameters": stored, "percent": round(pct, 4),
                         "meets_goal": pct <= GOALS["overhead_percent"]})
        # The largest rank (columns kept by some ratio) whose artifact stays within the goal.
        fixed = overhead_parameters({k: v for k, v in tensors.items() if not k.endswith(".basis")})
        per_column = 2 * len(groups) * p
        budget = GOALS["overhead_percent"] / 100 * params - fixed
        rows.append({"shape": name, "model_parameters": params, "grouping": grouping, "basis_dim": p,
                     "max_rank_within_goal": max(0, min(p, int(budget // per_column)))})
    return rows


# --- timing -----------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.repeats = warmup, repeats

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, warmup: int | None = None, repeats: int | None = None):
        out = None
        for _ in range(self.warmup if warmup is None else warmup):
            out = fn()
        times = []
        for _ in range(self.repeats if repeats is None else repeats):
            self.sync()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t)
        return summary(times), out


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times),
            "spread_percent": round(100 * (max(times) - min(times)) / statistics.median(times), 1) if times else None}


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict, key: str):
    """Peak GPU memory allocated inside the block (CUDA), or the process's peak RSS so far (CPU, labelled)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        out[key] = {"peak_allocated_GB": round(torch.cuda.max_memory_allocated() / 1e9, 3),
                    "peak_over_start_GB": round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)}
    else:
        out[key] = {"process_peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)}


# --- the measurements ---------------------------------------------------------------------------------------------
def build_model(config, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: an 8B model is never materialised on the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def calibration_data() -> list[Path]:
    corpus = ROOT / "artifacts" / "corpus"
    return [corpus / "calib.jsonl", corpus / "eval.jsonl", corpus / "train.jsonl.xz"]


def run_calibration(model, tokenizer, out_dir: Path, tokens: int, seq_len: int, batch_size: int, grouping: str,
                    rank_cap: int | None, ratios: tuple[float, ...] | None, timer: Timer, device) -> dict:
    overrides = dict(max_tokens=tokens, seq_len=seq_len, batch_size=batch_size, pca_grouping=grouping, rank_cap=rank_cap)
    if ratios:
        overrides["ratios"] = ratios
    mem: dict = {}
    with peak_memory(device, mem, "memory"):
        stats, report = timer(lambda: kvcal.calibrate(model=model, tokenizer=tokenizer, data=calibration_data(),
                                                      out=out_dir, progress=False, **overrides), warmup=0, repeats=1)
    meta = report.artifact.meta
    return {"wall_s": round(stats["median_s"], 2), **mem["memory"], "tokens": meta["calibration"]["tokens"],
            "sequences": meta["calibration"]["sequences"], "seq_len": seq_len, "batch_size": batch_size,
            "grouping": grouping, "rank_cap": rank_cap, "ratios": meta["ratios"],
            "artifact_overhead_percent": meta["overhead"]["percent"],
            "artifact_stored_parameters": meta["overhead"]["stored_parameters"],
            "meets_goal": stats["median_s"] < GOALS["calibration_s"]}


def device_transform(codec, kv, geo):
    """The codec's device work alone (no entropy stage): codes per group, and a decode of them back into ``kv``."""
    out = {}
    for kind in KINDS:
        for g in range(len(codec.groups)):
            rot = codec.kernel_rotary_dim(kind, g, kv[0][0].device)
            if rot is not None:
                out[(kind, g)] = (rot, kernels.encode_group(codec, kv, geo, kind, g, rot))
            else:
                projection, quantizer = codec.placed(kind, g, kv[0][0].device)
                rows = middle_rows(kv, geo, codec.adapter, kind, codec.groups[g])
                out[(kind, g)] = (None, quantizer.quantize(projection.project(rows)))
    return out


def device_decode(codec, kv, geo, coded) -> None:
    for (kind, g), (rot, codes) in coded.items():
        if rot is not None:
            kernels.decode_group(codec, kv, geo, kind, g, rot, codes)
        else:
            projection, quantizer = codec.placed(kind, g, kv[0][0].device)
            coords = quantizer.dequantize(codes, kv[0][0].device)
            scatter_middle(kv, geo, codec.adapter, kind, codec.groups[g], projection, coords, codec.layout)


def bench_codec(model, artifact_dir: Path, ids: torch.Tensor, ratios: list[float], timer: Timer, device,
                record, stage_repeats: int) -> dict:
    res: dict = {"tokens": ids.shape[1], "batch": ids.shape[0]}
    with torch.no_grad():
        prefill = lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values  # noqa: E731
        mem: dict = {}
        with peak_memory(device, mem, "memory"):
            stats, cache = timer(prefill)
        res["recompute"] = {**stats, **mem["memory"]}
        record()
        kv, _ = cache_tensors(cache)
        bf16_bytes = sum(t.numel() * 2 for pair in kv for t in pair)
        res["cache_bf16_GB"] = round(bf16_bytes / 1e9, 4)
        res["ratios"] = []
        for ratio in ratios:
            codec = kvcal.load(artifact_dir, ratio=ratio, model=model, device=device, kernels=KERNELS)
            row: dict = {"ratio": ratio, "kernels": any(codec.kernel_rotary_dim(k, g, device) is not None
                                                         for k in KINDS for g in range(len(codec.groups)))}
            c_stats, blob = timer(lambda: codec.compress(cache))  # noqa: B023
            mem = {}
            with peak_memory(device, mem, "memory"):
                d_stats, restored = timer(lambda: codec.decompress(blob, device=device))  # noqa: B023
            del restored
            st = codec.stats(blob)
            row.update({
                "blob_bytes": len(blob), "middle_ratio": round(st["middle_ratio"], 2), "whole_ratio": round(st["whole_ratio"], 2),
                "compress": c_stats, "decompress": {**d_stats, **mem["memory"]},
                "compress_GBps": round(bf16_bytes / 1e9 / c_stats["median_s"], 3),
                "decompress_GBps": round(bf16_bytes / 1e9 / d_stats["median_s"], 3),
                "restore_over_recompute": round(res["recompute"]["median_s"] / d_stats["median_s"], 3),
            })
            # Where the time goes: the device's transform (kernels or torch) against the host's entropy stage.
            geo = codec.geometry(kv, None, tuple(0 for _ in kv), None)
            once = dict(warmup=1, repeats=stage_repeats)
            t_stats, coded = timer(lambda: device_transform(codec, kv, geo), **once)  # noqa: B023
            scratch = [(k.clone(), v.clone()) for k, v in kv]
            u_stats, _ = timer(lambda: device_decode(codec, scratch, geo, coded), **once)  # noqa: B023
            host_codes = {key: codes.cpu().numpy() for key, (_, codes) in coded.items()}
            e_stats, payloads = timer(lambda: {key: codec.stage.encode(c, codec.quantizers[key].models)  # noqa: B023
                                               for key, c in host_codes.items()}, warmup=0, repeats=stage_repeats)  # noqa: B023
            n = geo.middle_tokens
            x_stats, _ = timer(lambda: [codec.stage.decode(p, n, codec.quantizers[key].models)  # noqa: B023
                                        for key, p in payloads.items()], warmup=0, repeats=stage_repeats)  # noqa: B023
            row["stages"] = {"device_encode_GBps": round(bf16_bytes / 1e9 / t_stats["median_s"], 3),
                             "device_decode_GBps": round(bf16_bytes / 1e9 / u_stats["median_s"], 3),
                             "host_entropy_encode_s": round(e_stats["median_s"], 4),
                             "host_entropy_decode_s": round(x_stats["median_s"], 4),
                             "device_encode": t_stats, "device_decode": u_stats}
            res["ratios"].append(row)
            record()
            print(json.dumps({k: row[k] for k in ("ratio", "compress_GBps", "decompress_GBps", "restore_over_recompute")}),
                  flush=True)
    return res


def bench_generate(model, artifact_dir: Path, ids: torch.Tensor, new_tokens: int, ratio: float, timer: Timer,
                   device) -> dict:
    codec = kvcal.load(artifact_dir, ratio=ratio, model=model, device=device, kernels=KERNELS)
    mask = torch.ones_like(ids)
    out: dict = {"prompt_tokens": ids.shape[1], "batch": ids.shape[0], "new_tokens": new_tokens, "ratio": ratio}

    def gen(cache):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, past_key_values=cache)

    for name, make in (("dynamic", lambda: None), ("kvtc", lambda: KVTCCache(codec, config=model.config))):
        mem: dict = {}
        with peak_memory(device, mem, "memory"):
            stats, _ = timer(lambda: gen(make()), warmup=1, repeats=max(1, min(timer.repeats, 3)))  # noqa: B023
        out[name] = {**stats, **mem["memory"],
                     "tokens_per_s": round(ids.shape[0] * new_tokens / stats["median_s"], 2)}
    cache = KVTCCache(codec, config=model.config)
    gen(cache)
    with torch.no_grad():
        dyn = model(input_ids=torch.cat([ids, ids[:, :new_tokens]], 1), use_cache=True, logits_to_keep=1).past_key_values
    out["kvtc_resident_bytes"] = cache.resident_bytes()
    out["dynamic_cache_bytes"] = dynamic_cache_bytes(dyn)
    return out


# --- report -------------------------------------------------------------------------------------------------------
def environment(device: torch.device, smoke: bool) -> dict:
    env = {"mode": "cpu-smoke" if smoke else "gpu", "device": str(device), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(), "triton": None, "kernel_dot_precision": kernels.dot_precision(), "kernels_used": kernels.use_kernels(KERNELS, device),
           "command": "python " + " ".join(sys.argv)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["device_memory_GB"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    if kernels.triton_available():
        import triton

        env["triton"] = triton.__version__
    return env


def markdown(result: dict) -> str:
    env = result["environment"]
    smoke = env["mode"] == "cpu-smoke"
    lines = []
    if smoke:
        lines += ["**CPU smoke run: tiny shapes of the two families, on the CPU. These are not the issue's figures and "
                  "say nothing about GPU speed; they only show the script runs end to end.**", ""]
    lines += [f"Device: {env.get('device_name', env['device'])}; torch {env['torch']}, CUDA {env['cuda']}, "
              f"triton {env['triton']}, fused kernels used: {env['kernels_used']}.", "", f"Command: `{env['command']}`", ""]
    lines += [f"Earlier command (merged): `{c}`" for c in result.get("earlier_commands", [])]
    for name, shape in result["shapes"].items():
        lines += [f"## {name}{' (tiny, smoke)' if smoke else ''}", ""]
        cal = shape.get("calibration")
        if cal:
            mem = (f"peak GPU memory {cal['peak_allocated_GB']} GB" if "peak_allocated_GB" in cal
                   else f"process peak RSS {cal.get('process_peak_rss_GB')} GB")
            verdict = {True: "met", False: "not met", None: "no verdict on a smoke run"}[cal["meets_goal"]]
            lines += [f"Calibration: {cal['tokens']:,} tokens ({cal['grouping']}, seq {cal['seq_len']}, batch "
                      f"{cal['batch_size']}): **{cal['wall_s']} s** (goal < {GOALS['calibration_s']:.0f} s: "
                      f"{verdict}), {mem}; artifact overhead {cal['artifact_overhead_percent']}% of the model's "
                      "parameters.", ""]
        codec = shape.get("codec")
        if codec:
            rec = codec["recompute"]
            lines += [f"Cache: {codec['batch']} x {codec['tokens']} tokens, {codec['cache_bf16_GB']} GB as bf16. "
                      f"Recompute (prefill): {rec['median_s'] * 1e3:.1f} ms (median of {rec['n']}, spread "
                      f"{rec['spread_percent']}%).", "",
                      "| ratio | measured middle ratio | compress GB/s | decompress GB/s | restore ms | restore / recompute "
                      "| device encode GB/s | device decode GB/s | host entropy enc / dec s |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in codec["ratios"]:
                s = r["stages"]
                lines.append(f"| {r['ratio']:g} | {r['middle_ratio']} | {r['compress_GBps']} | {r['decompress_GBps']} | "
                             f"{r['decompress']['median_s'] * 1e3:.1f} | {r['restore_over_recompute']}x | "
                             f"{s['device_encode_GBps']} | {s['device_decode_GBps']} | "
                             f"{s['host_entropy_encode_s']} / {s['host_entropy_decode_s']} |")
            lines += ["", f"Goals: restore >= {GOALS['restore_over_recompute']:g}x recompute, compress and decompress >= "
                      f"{GOALS['throughput_GBps']:g} GB/s.", ""]
        gen = shape.get("generate")
        if gen:
            lines += [f"generate(): batch {gen['batch']}, prompt {gen['prompt_tokens']}, {gen['new_tokens']} new tokens, "
                      f"ratio {gen['ratio']:g}.", "",
                      "| cache | tokens/s | " + ("process peak RSS GB" if smoke else "peak GPU memory GB") + " |",
                      "|---|---|---|"]
            for name_ in ("dynamic", "kvtc"):
                g = gen[name_]
                lines.append(f"| {name_} | {g['tokens_per_s']} | "
                             f"{g.get('peak_allocated_GB', g.get('process_peak_rss_GB'))} |")
            lines += ["", f"Resident cache after generating: KVTCCache {gen['kvtc_resident_bytes']:,} B, DynamicCache "
                      f"{gen['dynamic_cache_bytes']:,} B.", ""]
    if result.get("overhead"):
        lines += overhead_markdown(result["overhead"])
    return "\n".join(lines) + "\n"


def overhead_markdown(rows: list[dict]) -> list[str]:
    lines = ["## Artifact overhead (exact: the artifact's tensor shapes against the model's parameter count)", "",
             "What `kvcal calibrate` counts as overhead (`overhead_parameters`): per PCA group and kind (keys, values) the "
             "mean, the basis columns stored (rank: the highest coordinate any calibrated ratio keeps, per group) and the "
             "metric's weight and inverse (two 128 x 128 blocks per layer and KV head); per-layer grouping has one group "
             "per layer, cross-layer one for all. Model parameters are counted on the meta device from the real config.",
             "",
             "| shape | model parameters | grouping | basis dim | rank | stored parameters | share | <= 2.4% |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "rank" in r:
            lines.append(f"| {r['shape']} | {r['model_parameters']:,} | {r['grouping']} | {r['basis_dim']} | {r['rank']} | "
                         f"{r['stored_parameters']:,} | {r['percent']}% | {'yes' if r['meets_goal'] else 'no'} |")
    lines += ["", "Largest basis rank within the 2.4% goal:", ""]
    lines += [f"- {r['shape']}, {r['grouping']}: {r['max_rank_within_goal']} of {r['basis_dim']}"
              for r in rows if "max_rank_within_goal" in r]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU; outputs labelled, outside results/")
    ap.add_argument("--overhead-only", action="store_true", help="only the exact overhead arithmetic (any machine)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--codec-shapes", nargs="*", default=None, choices=list(SHAPES),
                    help="shapes that get the codec and generate() benchmarks (default: all of --shapes)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ratios", type=float, nargs="*", default=[16.0, 64.0])
    ap.add_argument("--calibration-shape", default="mistral-nemo-12b", choices=list(SHAPES),
                    help="the shape whose calibration is the measured one (gets --calib-tokens)")
    ap.add_argument("--calib-tokens", type=int, default=1 << 20)
    ap.add_argument("--codec-calib-tokens", type=int, default=1 << 17,
                    help="calibration tokens for the other shapes (their artifact only feeds the codec benchmarks)")
    ap.add_argument("--calib-seq-len", type=int, default=1024)
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--grouping", default="cross-layer", choices=["cross-layer", "per-layer"])
    ap.add_argument("--rank-cap", type=int, default=None)
    ap.add_argument("--calib-ratios", type=float, nargs="*", default=None,
                    help="ratios to calibrate (default: the recipe's, which include 16 and 64)")
    ap.add_argument("--gen-batch", type=int, default=1)
    ap.add_argument("--gen-prompt", type=int, default=2048)
    ap.add_argument("--gen-new", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stage-repeats", type=int, default=1, help="timed runs of each separately timed stage")
    ap.add_argument("--merge", action="store_true",
                    help="keep the shapes an earlier run wrote to the same --out-dir (a benchmark split over calls)")
    ap.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                    help="the codec's kernels mode (triton on a CPU needs TRITON_INTERPRET=1: a check of the path only)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="default: results/ on a GPU, /tmp/kvcal-bench-gpu-smoke with --cpu-smoke")
    args = ap.parse_args()

    smoke = args.cpu_smoke
    global KERNELS
    KERNELS = args.kernels
    if smoke:
        args.tokens, args.batch = min(args.tokens, 320), min(args.batch, 2)
        args.calib_tokens = args.codec_calib_tokens = min(args.calib_tokens, 4096)
        args.calib_seq_len, args.calib_batch = min(args.calib_seq_len, 256), min(args.calib_batch, 2)
        args.gen_prompt, args.gen_new, args.repeats = min(args.gen_prompt, 256), min(args.gen_new, 8), min(args.repeats, 3)
        args.calib_ratios = args.calib_ratios or [16.0, 64.0]
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type != "cuda" and not smoke and not args.overhead_only:
        sys.exit("bench_gpu.py: no CUDA device here; run it on a GPU, or pass --cpu-smoke (tiny shapes, labelled as a "
                 "CPU smoke run) or --overhead-only")
    out_dir = args.out_dir or (Path(tempfile.gettempdir()) / "kvcal-bench-gpu-smoke" if smoke else ROOT / "results")
    out_dir.mkdir(parents=True, exist_ok=True)

    overhead = [row for name in args.shapes for row in overhead_rows(name, config_for(name, False),
                                                                         [256, 512, 1024, 2048, 4096])]
    if args.overhead_only:
        result = {"environment": environment(torch.device("cpu"), False) | {"mode": "overhead-only"}, "goals": GOALS,
                  "overhead": overhead}
        (out_dir / "artifact_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
        text = ["Artifact overhead at the 8B/12B shapes, computed exactly (no GPU needed).", "",
                f"Command: `{result['environment']['command']}`", ""] + overhead_markdown(overhead)
        (out_dir / "artifact_overhead.md").write_text("\n".join(text) + "\n")
        print("\n".join(text))
        return

    from kvcal.models import load_model

    _, tokenizer = load_model(ROOT / "artifacts" / "kvcal-ref-llama", "cpu")  # ids < 4096: valid in every vocab here
    timer = Timer(device, args.warmup, args.repeats)
    result = {"environment": environment(device, smoke), "goals": GOALS, "shapes": {}, "overhead": overhead}
    stem = "bench_gpu"
    previous = out_dir / f"{stem}.json"
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("environment", {}).get("mode") == result["environment"]["mode"]:
            result["shapes"] = {k: v for k, v in old.get("shapes", {}).items() if k not in args.shapes}
            result["earlier_commands"] = old.get("earlier_commands", []) + [old["environment"]["command"]]

    def record() -> None:
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out_dir / f"{stem}.md").write_text(markdown(result))

    codec_shapes = args.shapes if args.codec_shapes is None else args.codec_shapes
    g = torch.Generator().manual_seed(0)
    for name in args.shapes:
        config = config_for(name, smoke)
        shape: dict = {"config": {k: getattr(config, k) for k in ("num_hidden_layers", "num_key_value_heads", "head_dim",
                                                                    "hidden_size", "vocab_size")}}
        result["shapes"][name] = shape
        model = build_model(config, device)
        shape["model_parameters"] = sum(p.numel() for p in model.parameters())
        print(f"{name}: {shape['model_parameters']:,} parameters on {device}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            measured = name == args.calibration_shape
            shape["calibration"] = run_calibration(
                model, tokenizer, Path(tmp), args.calib_tokens if measured else args.codec_calib_tokens,
                args.calib_seq_len, args.calib_batch, args.grouping, args.rank_cap,
                tuple(args.calib_ratios) if args.calib_ratios else None, timer, device)
            shape["calibration"]["measured_shape"] = measured
            if smoke:  # tiny shapes on a CPU: no verdict against the goals
                shape["calibration"]["meets_goal"] = None
            record()
            print(json.dumps({name: shape["calibration"]}), flush=True)
            if name in codec_shapes:
                ids = torch.randint(5, 4000, (args.batch, args.tokens), generator=g).to(device)
                shape["codec"] = bench_codec(model, Path(tmp), ids, args.ratios, timer, device, record, args.stage_repeats)
                record()
                gen_ids = ids[: args.gen_batch, : args.gen_prompt]
                shape["generate"] = bench_generate(model, Path(tmp), gen_ids, args.gen_new, args.ratios[0], timer, device)
                record()
                print(json.dumps({name: shape["generate"]}, default=str), flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record()
    print(markdown(result))
    print(f"wrote {out_dir / (stem + '.json')} and .md")


if __name__ == "__main__":
    main()
