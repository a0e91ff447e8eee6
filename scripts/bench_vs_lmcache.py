"""LMCache side by side: LMCache's own fp8 and TurboQuant serdes and kvcal's ``kvtc`` serde, through LMCache's API,
in kvcal's rate–quality harness, on the bundled reference models.

LMCache (0.5.6) pins numpy<=2.2.6 and transformers>=5.4, so this runs in its own virtual environment (``--venv``,
default ``.lmcache-venv/``, created on first use with ``pip install -e ".[lmcache,dev]" triton``; LMCache is never a
dependency of kvcal's base install). Run it with any python: it re-executes itself there.

    python scripts/bench_vs_lmcache.py                      # both models, the full harness (64 windows, 128 needles)
    python scripts/bench_vs_lmcache.py --venv /path/to/venv  # an existing environment with kvcal[lmcache]

How a cache goes through a serde. For every perplexity window and needle context, kvcal's harness prefills the
model once; each method then cuts the prefilled cache into LMCache's chunks (``--chunk-size`` tokens, aligned at
position 0 as LMCache aligns them; the last one shorter), lays each out as LMCache does, ``[2, layers, tokens,
kv_heads * head_dim]`` in bf16 with post-RoPE keys, and sends it through the serde's ``AsyncSerdeProcessor``
(``submit_serialize`` into a buffer of ``estimate_serialized_size`` bytes, narrowed to what the serializer wrote;
then ``submit_deserialize`` from exactly those bytes). Bytes are what each serializer wrote, for every chunk; the
ratio is the chunks' bf16 bytes over them. As in every kvcal harness method, the first ``sink`` and last ``window``
tokens stay exact (the engine's business), so the model continues from the decoded middle.

Methods: ``lmcache-fp8`` (LMCache's fp8 serde, e4m3); ``lmcache-tq-<preset>`` (LMCache's TurboQuant serde, each
preset, ``head_dim`` of the model, no skipped layers: its default skips 2 + 2 layers, meant for deep models, which
on these 6-layer models would leave two thirds of the cache uncompressed); ``lmcache-kvtc`` (kvcal's serde on the
model's pre-RoPE artifact, chunk offsets estimated by the serde since LMCache passes none); ``lmcache-kvtc-postrope``
(the serde on an artifact calibrated on post-RoPE keys, which needs no position). Both artifacts are calibrated here
on first use into ``results/tmp/lmcache/`` (~100 s each a model, one thread) with the model's recipe, the bundled
corpus and the same ratios, so they differ only in the key frame.

TurboQuant refuses to run without CUDA, and its Triton kernels under ``TRITON_INTERPRET=1`` crawl, so its two
kernels run as the pure-torch port in ``kvcal/integrations/lmcache_turboquant_port.py``; everything else is
LMCache's serializer code. The bench first checks the port against the interpreted Triton kernels on a small
input (in a subprocess with ``TRITON_INTERPRET=1``) and records the result.

Writes ``results/bench_vs_lmcache.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[1]
LMCACHE_VERSION = "0.5.6"
DEFAULT_MODELS = ("artifacts/kvcal-ref-llama", "artifacts/kvcal-ref-qwen3")
TQ_PRESETS = ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")
CALIBRATED_RATIOS = (8.0, 16.0, 24.0, 32.0, 40.0, 48.0, 56.0, 64.0, 80.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--kvtc-ratios", nargs="+", type=float, default=[16.0, 32.0, 48.0, 56.0, 64.0, 80.0])
    p.add_argument("--postrope-ratios", nargs="+", type=float, default=[16.0, 32.0, 48.0, 56.0, 64.0, 80.0])
    p.add_argument("--presets", nargs="+", default=list(TQ_PRESETS), help="TurboQuant presets to run")
    p.add_argument("--chunk-size", type=int, default=256, help="LMCache's chunk size (tokens)")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--needles", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--venv", type=Path, default=ROOT / ".lmcache-venv")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--part", type=Path, default=None,
                   help="write this run's per-model reports to PART (JSON) instead of the final files; "
                        "--merge combines parts")
    p.add_argument("--merge", nargs="+", type=Path, default=None, help="combine --part files into the results")
    p.add_argument("--check-port", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the environment -----------------------------------------------------------------------------------------
def have_lmcache() -> bool:
    try:
        from importlib.metadata import version

        return version("lmcache") == LMCACHE_VERSION
    except Exception:
        return False


def ensure_venv(venv: Path) -> Path:
    """The LMCache environment's python, after creating it (kvcal with the lmcache extra, and triton for the port
    check) if it is not yet."""
    from kvcal.eval.peer_env import ensure_peer_venv

    return ensure_peer_venv(venv, "import kvcal.integrations.lmcache, triton; from importlib.metadata import version; "
                            f"assert version('lmcache') == '{LMCACHE_VERSION}'",
                            ["-e", f"{ROOT}[lmcache,dev]", "triton"], f"lmcache {LMCACHE_VERSION}")


# --- the port check (subprocess with TRITON_INTERPRET=1) -------------------------------------------------------
def check_port() -> dict:
    """LMCache's Triton store and dequant kernels (interpreted) against the torch port, per preset, on one input."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from lmcache.v1.distributed.serde.turboquant import decode_kernel as dk
    from lmcache.v1.distributed.serde.turboquant import turboquant as tq
    from lmcache.v1.distributed.serde.turboquant.store_kernel import triton_turboquant_store

    from kvcal.integrations.lmcache_turboquant_port import FullDequant, turboquant_store

    dk._FP8_E4B15[0] = 0  # the e4nv FP8 format (Hopper); the CPU has no capability to ask
    torch.manual_seed(0)
    n, h, d, bs = 37, 2, 64, 16
    key = (torch.randn(n, h, d) * 3).to(torch.bfloat16)
    val = torch.randn(n, h, d).to(torch.bfloat16)
    out = {"input": f"{n} tokens x {h} heads x head_dim {d}, bf16, block {bs}, layer 3's rotation", "presets": {}}
    for preset in TQ_PRESETS:
        cfg = tq.TurboQuantSerdeConfig(preset=preset, head_dim=d, block_size=bs)
        blocks = math.ceil(n / bs)
        pi_t, mid, cen = tq._make_tq_tensors_for_layer(cfg, 3, torch.device("cpu"))
        caches, seconds = [], []
        for fn in (triton_turboquant_store, turboquant_store):
            cache = torch.zeros(blocks, bs, h, cfg.slot_size_aligned, dtype=torch.uint8)
            t0 = time.perf_counter()
            fn(key, val, cache, torch.arange(n, dtype=torch.int32), pi_t, mid, mse_bits=cfg.key_mse_bits,
               key_packed_size=cfg.key_packed_size, value_quant_bits=cfg.value_quant_bits, key_fp8=cfg.key_fp8)
            seconds.append(time.perf_counter() - t0)
            caches.append(cache.view(-1, h, cfg.slot_size_aligned)[:n])
        slot = cfg.key_packed_size + math.ceil(d * cfg.value_quant_bits / 8) + 4
        key_bytes = cfg.key_packed_size
        diff_k = int((caches[0][..., :key_bytes] != caches[1][..., :key_bytes]).sum())
        diff_v = int((caches[0][..., key_bytes:slot] != caches[1][..., key_bytes:slot]).sum())
        decoded = []
        for kern in (dk._tq_full_dequant_kv, FullDequant()):
            k_out = torch.zeros(1, h, blocks * bs, d, dtype=torch.float16)
            v_out = torch.zeros_like(k_out)
            table = torch.arange(blocks, dtype=torch.int32).view(1, blocks)
            src = torch.zeros(blocks, bs, h, cfg.slot_size_aligned, dtype=torch.uint8)
            src.view(-1, h, cfg.slot_size_aligned)[:n] = caches[0]
            kern[(blocks * bs, h)](
                src, table, cen, k_out, v_out, k_out.stride(0), k_out.stride(1), k_out.stride(2), v_out.stride(0),
                v_out.stride(1), v_out.stride(2), src.stride(0), src.stride(1), src.stride(2), table.stride(0),
                HEAD_DIM=d, BLOCK_SIZE=bs, NUM_KV_HEADS=h, MSE_BYTES=math.ceil(d * cfg.key_mse_bits / 8) if not cfg.key_fp8 else d,
                KPS=cfg.key_packed_size, VQB=cfg.value_quant_bits, VAL_DATA_BYTES=math.ceil(d * cfg.value_quant_bits / 8),
                MSE_BITS=cfg.key_mse_bits, KEY_FP8=int(cfg.key_fp8), BLOCK_D=d, NORM_CORRECTION=int(cfg.norm_correction),
                FP8_E4B15=0, num_warps=4)
            decoded.append((k_out[:, :, :n].view(torch.int16), v_out[:, :, :n].view(torch.int16)))
        dec_same = all(torch.equal(a, b) for a, b in zip(*decoded))
        row = {"store_key_bytes_differing": diff_k, "store_value_bytes_differing": diff_v,
               "store_bytes_compared": int(n * h * slot), "dequant_identical": dec_same,
               "triton_interpreted_s": round(seconds[0], 3), "port_s": round(seconds[1], 4)}
        if cfg.key_fp8 and diff_k:
            # Where the fp8 key bytes differ, say whether the port is the round-to-nearest-even result of the input.
            k_in = key.reshape(n, h, d).float()
            rne = k_in.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
            row["port_key_bytes_equal_rne"] = bool(torch.equal(caches[1][..., :d], rne))
            tri = caches[0][..., :d].contiguous().view(torch.float8_e4m3fn).float()
            lo = rne.view(torch.float8_e4m3fn).float()
            bad = caches[0][..., :d] != rne
            row["interpreter_values_at_differing_bytes"] = [[round(x, 5), round(t, 5), round(r, 5)] for x, t, r in
                                                            zip(k_in[bad][:6].tolist(), tri[bad][:6].tolist(), lo[bad][:6].tolist())]
        out["presets"][preset] = row
    return out


# --- running inside the LMCache environment --------------------------------------------------------------------
def memory_obj(t):
    """A CPU ``TensorMemoryObj`` holding a copy of ``t`` (LMCache's own memory object type)."""
    import torch
    from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj

    t = t.contiguous()
    meta = MemoryObjMetadata(shape=t.shape, dtype=t.dtype, address=0, phy_size=t.numel() * t.element_size(),
                             ref_count=1, shapes=[t.shape], dtypes=[t.dtype])
    return TensorMemoryObj(t.view(-1).view(torch.uint8).clone(), meta, None)


def wait(query, task: int) -> bool:
    while True:
        done = query(task)
        if done is not None:
            return done
        time.sleep(1e-4)


@dataclass
class ChunkLog:
    """Per method: the chunks it sent, and (kvtc) where the serde placed them against where they were."""

    chunks: int = 0
    serialized: int = 0
    offsets_right: int = 0
    offsets_checked: int = 0
    serialize_s: float = 0.0
    deserialize_s: float = 0.0
    # Squared error of the decoded middle tokens against the prefilled cache, and their squared norm (keys, values).
    key_err2: float = 0.0
    key_norm2: float = 0.0
    value_err2: float = 0.0
    value_norm2: float = 0.0


LOGS: dict[str, ChunkLog] = {}
PROCESSORS: dict[tuple, object] = {}
SETTINGS: dict = {}


def processor_for(kind: str, ratio: float | None):
    from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor

    model = SETTINGS["model"]
    key = (model, kind, ratio)
    if key not in PROCESSORS:
        if kind == "fp8":
            cfg = SerdeConfig("fp8", {"fp8_dtype": "float8_e4m3fn"})
        elif kind.startswith("turboquant"):
            cfg = SerdeConfig("turboquant", {"preset": kind, "head_dim": SETTINGS["head_dim"], "block_size": 16,
                                             "skip_first_layers": 0, "skip_last_layers": 0})
        else:
            artifact = SETTINGS["artifact"] if kind == "kvtc" else SETTINGS["postrope_artifact"]
            cfg = SerdeConfig("kvtc", {"artifact": str(artifact), "model": model, "ratio": ratio,
                                       "chunk_size": SETTINGS["chunk_size"]})
        PROCESSORS[key] = create_serde_processor(cfg)
    return PROCESSORS[key]


def make_methods():
    """kvcal harness methods that send the cache through an LMCache serde (registered into kvcal's registry)."""
    import torch
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey

    from kvcal.errors import RatioError
    from kvcal.eval.methods import METHODS
    from kvcal.eval.methods.base import CacheMethod, MethodOutput, splice_middle, with_layers

    class LMCacheSerde(CacheMethod):
        serde: ClassVar[str] = ""

        def apply(self, pre, ctx, ratio):
            from kvcal.integrations.lmcache import parse_chunk

            proc = processor_for(self.serde, ratio)
            log = LOGS.setdefault(f"{self.name}@{ratio}", ChunkLog())
            layers = pre.cache.layers
            n, cs = pre.length, SETTINGS["chunk_size"]
            spans = [(s, min(n, s + cs)) for s in range(0, n, cs)]
            srcs, dsts, keys = [], [], []
            for i, (a, b) in enumerate(spans):
                t = torch.stack([torch.stack([(lay.keys if kv == 0 else lay.values)[0, :, a:b].permute(1, 0, 2).reshape(b - a, -1)
                                              for lay in layers]) for kv in (0, 1)]).to(torch.bfloat16)
                srcs.append(memory_obj(t))
                size = proc.estimate_serialized_size(MemoryLayoutDesc(shapes=[t.shape], dtypes=[t.dtype]))
                dsts.append(memory_obj(torch.zeros(size, dtype=torch.uint8)))
                keys.append(ObjectKey(chunk_hash=f"{id(pre)}-{i}".encode(), model_name=SETTINGS["model_name"], kv_rank=0))
            t0 = time.perf_counter()
            if not wait(proc.query_serialize_result, proc.submit_serialize(srcs, dsts, keys)):
                raise RuntimeError(f"{self.name}: LMCache's serialize task failed (see its log above)")
            t1 = time.perf_counter()
            stored = [bytes(d.byte_array) for d in dsts]  # what an L2 adapter would persist: the narrowed buffer
            loaded = [memory_obj(torch.frombuffer(bytearray(s), dtype=torch.uint8)) for s in stored]
            outs = [memory_obj(torch.zeros_like(s.tensor)) for s in srcs]
            if not wait(proc.query_deserialize_result, proc.submit_deserialize(loaded, outs, keys)):
                raise RuntimeError(f"{self.name}: LMCache's deserialize task failed (see its log above)")
            log.serialize_s += t1 - t0
            log.deserialize_s += time.perf_counter() - t1
            log.chunks += len(spans)
            log.serialized += sum(map(len, stored))
            if self.serde == "kvtc":
                codec = proc._serializer.codec
                for (a, _), s in zip(spans, stored):
                    _, blob = parse_chunk(s)
                    geo, _ = codec.parse(bytes(blob))
                    log.offsets_checked += 1
                    log.offsets_right += int(geo.offsets[0] == a)
            decoded = torch.cat([o.tensor for o in outs], dim=2)  # [2, L, n, hidden]
            lo, hi = ctx.middle(n)
            replaced = {}
            for layer, lay in enumerate(layers):
                h, d = lay.keys.shape[1], lay.keys.shape[3]
                k, v = (decoded[kv, layer, lo:hi].reshape(hi - lo, h, d).permute(1, 0, 2)[None].float() for kv in (0, 1))
                ref_k, ref_v = lay.keys[:, :, lo:hi].float(), lay.values[:, :, lo:hi].float()
                log.key_err2 += float(((k - ref_k) ** 2).sum())
                log.key_norm2 += float((ref_k**2).sum())
                log.value_err2 += float(((v - ref_v) ** 2).sum())
                log.value_norm2 += float((ref_v**2).sum())
                replaced[layer] = (splice_middle(lay.keys, lo, hi, k), splice_middle(lay.values, lo, hi, v))
            bf16 = n * ctx.bf16_bytes_per_token()
            return MethodOutput(with_layers(pre.cache, replaced), sum(map(len, stored)), bf16)

    @dataclass(frozen=True)
    class Fp8(LMCacheSerde):
        name: ClassVar[str] = "lmcache-fp8"
        summary: ClassVar[str] = "LMCache's fp8 serde (e4m3), through LMCache's API"
        serde: ClassVar[str] = "fp8"

    classes = [Fp8]
    for preset in TQ_PRESETS:
        short = preset.removeprefix("turboquant_").removesuffix("_nc")
        classes.append(dataclass(frozen=True)(type(f"Tq_{short}", (LMCacheSerde,), {
            "__annotations__": {}, "name": f"lmcache-tq-{short}", "serde": preset,
            "summary": f"LMCache's TurboQuant serde, preset {preset} (torch port of its kernels)"})))

    @dataclass(frozen=True)
    class Kvtc(LMCacheSerde):
        name: ClassVar[str] = "lmcache-kvtc"
        summary: ClassVar[str] = "kvcal's kvtc serde through LMCache's API (chunk offsets estimated)"
        serde: ClassVar[str] = "kvtc"
        takes_ratio: ClassVar[bool] = True
        needs_artifact: ClassVar[bool] = True

        def check(self, ctx, ratio):
            super().check(ctx, ratio)
            if ratio is None:
                raise RatioError(f"{self.name} needs a ratio")
            ctx.artifact.check_ratio(ratio)

    @dataclass(frozen=True)
    class KvtcPostRope(Kvtc):
        name: ClassVar[str] = "lmcache-kvtc-postrope"
        summary: ClassVar[str] = "kvcal's kvtc serde on an artifact calibrated on post-RoPE keys (no positions)"
        serde: ClassVar[str] = "kvtc-postrope"

        def check(self, ctx, ratio):
            from kvcal.artifact import Artifact

            Artifact.load(SETTINGS["postrope_artifact"]).check_ratio(ratio)

    classes += [Kvtc, KvtcPostRope]
    for cls in classes:
        METHODS[cls.name] = cls
    return [c.name for c in classes]


def frame_artifact(model_dir: Path, frame: str, ratios) -> Path:
    """The model's artifact in key ``frame`` (pre- or post-RoPE), calibrated here with the model's recipe and the
    bundled calibration corpus into ``results/tmp/lmcache/`` (reused when it holds ``ratios``). Both frames come
    from the same calibration settings and ratios, so they differ only in the key frame."""
    import kvcal
    from kvcal.artifact import Artifact
    from kvcal.integrations.post_rope import POST_ROPE, calibrate_post_rope, key_frame

    out = ROOT / "results" / "tmp" / "lmcache" / f"{frame}-{model_dir.name}"
    try:
        art = Artifact.load(out)
        if key_frame(art) == frame and all(float(r) in art.ratios for r in ratios):
            return out
    except Exception:
        pass
    t0 = time.perf_counter()
    grid = tuple(sorted(set(CALIBRATED_RATIOS) | {float(r) for r in ratios}))
    if frame == POST_ROPE:
        calibrate_post_rope(model_dir, out, ratios=grid, progress=False)
    else:
        kvcal.calibrate(model_dir, out=out, ratios=grid, progress=False)
    print(f"calibrated {out} ({frame} keys) in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def run_models(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from kvcal.artifact import Artifact
    from kvcal.data import bundled_corpus, load_texts
    from kvcal.eval.harness import EvalSettings, evaluate
    from kvcal.integrations.lmcache_turboquant_port import patched_turboquant
    from kvcal.models import load_model

    names = make_methods()
    wanted = [n for n in names if not n.startswith("lmcache-tq-") or
              any(n == f"lmcache-tq-{p.removeprefix('turboquant_').removesuffix('_nc')}" for p in args.presets)]
    settings = EvalSettings(windows=args.windows, needles=args.needles)
    texts = load_texts([bundled_corpus("eval")])
    reports, logs = [], {}
    with patched_turboquant():
        for model_dir in map(Path, args.models):
            model, tok = load_model(model_dir, device="cpu")
            pre = frame_artifact(model_dir, "pre-rope", args.kvtc_ratios)
            artifact = Artifact.load(pre)
            layout_head = model.config.get_text_config(decoder=True)
            SETTINGS.update(model=str(model_dir), model_name=model_dir.name, artifact=pre, chunk_size=args.chunk_size,
                            head_dim=getattr(layout_head, "head_dim", None) or layout_head.hidden_size // layout_head.num_attention_heads,
                            postrope_artifact=frame_artifact(model_dir, "post-rope", args.postrope_ratios))
            LOGS.clear()
            t0 = time.perf_counter()
            report = evaluate(model, tok, texts, methods=wanted, artifact=artifact, settings=settings, progress=False,
                              model_name=str(model_dir),
                              method_ratios={"lmcache-kvtc": args.kvtc_ratios, "lmcache-kvtc-postrope": args.postrope_ratios})
            print(f"{model_dir.name}: {time.perf_counter() - t0:.0f} s", flush=True)
            reports.append(report.to_json())
            logs[model_dir.name] = {k: vars(v) for k, v in LOGS.items()}
    for proc in PROCESSORS.values():
        proc.close()
    return {"reports": reports, "chunk_logs": logs}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("lmcache", "torch", "transformers", "numpy", "triton", "kvcal"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# --- the report ----------------------------------------------------------------------------------------------
BASELINES = ("lmcache-fp8", "lmcache-tq-k8v4", "lmcache-tq-4bit", "lmcache-tq-k3v4", "lmcache-tq-3bit")


def headline(report) -> dict:
    best = report.headline()
    base = {m: best.get(m) for m in BASELINES if m in best}
    best_base = max(((r, m) for m, r in base.items() if r is not None), default=(None, None))
    kvtc = best.get("lmcache-kvtc")
    post = best.get("lmcache-kvtc-postrope")
    return {"best_lmcache_serde": best_base[1], "best_lmcache_ratio": best_base[0], "kvtc_ratio": kvtc,
            "kvtc_postrope_ratio": post,
            "kvtc_over_best_lmcache": None if kvtc is None or best_base[0] is None else kvtc / best_base[0],
            "postrope_over_kvtc": None if kvtc is None or post is None else post / kvtc,
            "first_failing": report.first_failing()}


def markdown(doc: dict) -> str:
    from kvcal.eval.harness import MAX_PPL_DELTA_PCT, MAX_RETRIEVAL_DROP, EvalReport

    reports = [EvalReport.from_json(r) for r in doc["reports"]]
    s = reports[0].settings
    v = doc["environment"]
    lines = ["# kvcal's kvtc serde against LMCache's own serdes, through LMCache's API", "",
             f"`{doc['command']}`; environment: " + ", ".join(f"{k} {x}" for k, x in v.items()) + f"; {doc['threads']} thread(s) "
             f"per run, {doc['seconds']:.0f} s" + (f" summed over {doc['parts']} runs (one per model, run side by side)"
                                                   if doc.get("parts", 1) > 1 else "") + " including calibration of the artifacts.", "",
             f"Perplexity: {s.windows} windows of {s.prefix} + {s.continuation} tokens; needle probe: {s.needles} trials of "
             f"{s.needle_context} tokens. Every prefilled cache goes through the serde in LMCache chunks of {doc['chunk_size']} "
             "tokens (`[2, layers, tokens, kv_heads * head_dim]`, bf16, post-RoPE keys), via `AsyncSerdeProcessor`'s "
             "`submit_serialize` / `submit_deserialize`; the ratio is the chunks' bf16 bytes over the bytes each serializer "
             f"wrote (headers included). Sink ({s.sink}) and window ({s.window}) tokens stay exact for every method. "
             f"Iso-quality: Δppl <= {MAX_PPL_DELTA_PCT:g}% and needle accuracy within {MAX_RETRIEVAL_DROP:g} of the full cache.", ""]
    lines += ["## Headline", "", "| model | best LMCache serde (ratio at iso-quality) | kvtc serde | kvtc / best LMCache | "
              "kvtc post-RoPE artifact | post-RoPE / kvtc |", "|---|---|---:|---:|---:|---:|"]
    for r in reports:
        h = headline(r)

        def x(val, unit="x"):
            return "none passes" if val is None else f"{val:.2f}{unit}"
        lines.append(f"| {Path(r.model).name} | {h['best_lmcache_serde'] or 'none'} ({x(h['best_lmcache_ratio'])}) | "
                     f"{x(h['kvtc_ratio'])} | {x(h['kvtc_over_best_lmcache'])} | {x(h['kvtc_postrope_ratio'])} | "
                     f"{x(h['postrope_over_kvtc'])} |")
    for r in reports:
        name = Path(r.model).name
        lines += ["", f"## {name}", "",
                  f"Full cache: ppl {r.ppl_uncompressed:.4f}, needle accuracy {r.retrieval_full:.3f}; middle evicted: ppl "
                  f"{r.ppl_evicted:.4f}, needle {r.retrieval_evicted:.3f}.", "",
                  "| method | target | measured ratio | Δppl % [95% CI] | needle | Δneedle [95% CI] | passes |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for row in r.rows:
            if row.method == "uncompressed":
                continue
            ci = row.ppl_delta_ci
            rci = row.retrieval_delta_ci
            lines.append(f"| {row.method} | {'-' if row.target_ratio is None else f'{row.target_ratio:g}'} | "
                         f"{row.measured_ratio:.2f} | {row.ppl_delta_pct:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] | {row.retrieval:.3f} | "
                         f"{r.retrieval_delta(row):+.3f} [{rci[0]:+.3f}, {rci[1]:+.3f}] | {'yes' if r.passes(row) else 'no'} |")
        logs = doc["chunk_logs"].get(name, {})
        kv = {k: c for k, c in logs.items() if k.startswith("lmcache-kvtc@")}
        if kv:
            right = sum(c["offsets_right"] for c in kv.values())
            checked = sum(c["offsets_checked"] for c in kv.values())
            lines += ["", f"Chunk offsets estimated by the kvtc serde (no positions from LMCache): {right} of {checked} "
                      f"chunks placed at their true offset ({100.0 * right / max(checked, 1):.2f}%)."]
        lines += ["", "Relative RMS error of the decoded middle tokens (keys as cached, post-RoPE; values), and time per "
                  "chunk (one thread, this machine):", "",
                  "| method | ratio | key rel. RMSE | value rel. RMSE | chunks | serialize ms / chunk | deserialize ms / chunk |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        measured = {(row.method, row.target_ratio): row.measured_ratio for row in r.rows}
        for k, c in logs.items():
            method, _, target = k.partition("@")
            ratio = measured.get((method, None if target == "None" else float(target)))
            lines.append(f"| {k.replace('@None', '')} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                         f"{math.sqrt(c['key_err2'] / c['key_norm2']):.4f} | {math.sqrt(c['value_err2'] / c['value_norm2']):.4f} | "
                         f"{c['chunks']} | {1000 * c['serialize_s'] / max(c['chunks'], 1):.2f} | "
                         f"{1000 * c['deserialize_s'] / max(c['chunks'], 1):.2f} |")
    costs = {k: v for k, v in doc.get("frame_cost", {}).items() if v}
    if costs:
        lines += ["", "## What coding post-RoPE keys costs in ratio", "",
                  "From the calibration's own held-out measurement (same data, same recipe and ratios; keys + values, in the "
                  "attention-aware metric: the expected squared error of attention's output): the pre-RoPE artifact's "
                  "distortion at each ratio, the post-RoPE artifact's at the same ratio, and the ratio at which the post-RoPE "
                  "artifact reaches the pre-RoPE distortion (log-log interpolation; blank: below its lowest ratio).", "",
                  "| model | ratio | pre-RoPE distortion | post-RoPE distortion | post-RoPE ratio at equal distortion | cost (x) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for model, cost in costs.items():
            for row in cost["rows"]:
                post = "-" if row["post_distortion"] is None else f"{row['post_distortion']:.2f}"
                at = "-" if row["post_ratio_at_equal_distortion"] is None else f"{row['post_ratio_at_equal_distortion']:g}"
                cost_x = "-" if row["ratio_cost"] is None else f"{row['ratio_cost']:g}"
                lines.append(f"| {model} | {row['ratio']:g} | {row['pre_distortion']:.2f} | {post} | {at} | {cost_x} |")
    port = doc.get("port_check")
    if port:
        lines += ["", "## TurboQuant: the torch port against LMCache's Triton kernels", "",
                  f"`TRITON_INTERPRET=1`, triton {v.get('triton')}; input: {port['input']}. Bytes compared: every written slot "
                  "of the store kernel; dequant: the fp16 keys and values out of `_tq_full_dequant_kv` (bitwise), fed the "
                  "interpreted kernel's bytes.", "",
                  "| preset | store: key bytes differing | store: value bytes differing | of bytes | dequant identical | "
                  "interpreted s | port s |", "|---|---:|---:|---:|---|---:|---:|"]
        for preset, row in port["presets"].items():
            lines.append(f"| {preset} | {row['store_key_bytes_differing']} | {row['store_value_bytes_differing']} | "
                         f"{row['store_bytes_compared']} | {'yes' if row['dequant_identical'] else 'no'} | "
                         f"{row['triton_interpreted_s']} | {row['port_s']} |")
        fp8 = port["presets"].get("turboquant_k8v4", {})
        if fp8.get("store_key_bytes_differing"):
            lines += ["", "The FP8-key preset differs only in key bytes, where the port casts with round-to-nearest-even "
                      f"(port equals torch's RNE cast: {fp8.get('port_key_bytes_equal_rne')}), as `cvt.rn.satfinite` does on "
                      "the GPU, and the interpreter does not: it rounds exact ties away from zero and drops the carry when "
                      "rounding overflows the mantissa (input, interpreter, port): "
                      + ", ".join(f"{a} -> {b} vs {c}" for a, b, c in fp8.get("interpreter_values_at_differing_bytes", [])) + "."]
    return "\n".join(lines) + "\n"


def frame_cost(model_name: str) -> dict | None:
    """From the two artifacts' own held-out measurements (attention metric, keys + values, same data): at each
    pre-RoPE ratio, the ratio at which the post-RoPE artifact reaches the same distortion (log-log interpolation)."""
    from kvcal.artifact import Artifact

    tmp = ROOT / "results" / "tmp" / "lmcache"
    try:
        pre, post = (Artifact.load(tmp / f"{frame}-{model_name}") for frame in ("pre-rope", "post-rope"))
    except Exception:
        return None

    def curve(art):
        alloc = art.meta["allocations"]
        return sorted((float(r), sum(g["heldout_distortion"] for kind in ("k", "v") for g in alloc[r][kind])) for r in alloc)

    pre_c, post_c = curve(pre), curve(post)
    rows = []
    for ratio, dist in pre_c:
        match = None
        for (r0, d0), (r1, d1) in zip(post_c, post_c[1:]):
            if d0 <= dist <= d1 and d0 > 0:
                t = (math.log(dist) - math.log(d0)) / (math.log(d1) - math.log(d0))
                match = math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
        post_at = dict(post_c).get(ratio)
        rows.append({"ratio": ratio, "pre_distortion": round(dist, 3), "post_distortion": None if post_at is None else round(post_at, 3),
                     "post_ratio_at_equal_distortion": None if match is None else round(match, 2),
                     "ratio_cost": None if match is None else round(ratio / match, 2)})
    return {"rows": rows, "pre_artifact": str(pre.path), "post_artifact": str(post.path)}


# Plot styles: kvtc in kvcal's red, its post-RoPE variant dashed and hollow; LMCache's serdes as kvcal's namesakes.
STYLES = {
    "lmcache-kvtc": dict(color="#d62728", marker="o", linewidth=2.2),
    "lmcache-kvtc-postrope": dict(color="#d62728", marker="o", markerfacecolor="none", linestyle="--", linewidth=1.4),
    "lmcache-fp8": dict(color="#8c564b", marker="v"),
    "lmcache-tq-k8v4": dict(color="#1f77b4", marker="d"),
    "lmcache-tq-4bit": dict(color="#aec7e8", marker="d"),
    "lmcache-tq-k3v4": dict(color="#9467bd", marker="X"),
    "lmcache-tq-3bit": dict(color="#c5b0d5", marker="X"),
}


def finish(doc: dict, out: Path) -> None:
    from kvcal.eval.harness import METHOD_STYLES, EvalReport, plot_rate_quality

    METHOD_STYLES.update(STYLES)
    out.mkdir(parents=True, exist_ok=True)
    doc["frame_cost"] = {Path(r["model"]).name: frame_cost(Path(r["model"]).name) for r in doc["reports"]}
    for r in doc["reports"]:
        r["lmcache_headline"] = headline(EvalReport.from_json(r))
    (out / "bench_vs_lmcache.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "bench_vs_lmcache.md").write_text(markdown(doc))
    plot_rate_quality([EvalReport.from_json(r) for r in doc["reports"]], out / "bench_vs_lmcache.png")
    print((out / "bench_vs_lmcache.md").read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.check_port:
        print(json.dumps(check_port()))
        return
    if not have_lmcache():
        py = ensure_venv(args.venv)
        os.execv(str(py), [str(py), __file__, *sys.argv[1:]])
    sys.path.insert(0, str(ROOT))
    command = " ".join(["python", "scripts/bench_vs_lmcache.py", *sys.argv[1:]])
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        doc = {**parts[0], "command": " ; ".join([*(p["command"] for p in parts), command]), "parts": len(parts),
               "seconds": sum(p["seconds"] for p in parts),
               "reports": [r for p in parts for r in p["reports"]],
               "chunk_logs": {k: v for p in parts for k, v in p["chunk_logs"].items()}}
        finish(doc, args.out)
        return
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    check = subprocess.run([sys.executable, __file__, "--check-port"], env=env, capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"the TurboQuant port check failed:\n{check.stderr[-3000:]}")
    port = json.loads(check.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    result = run_models(args)
    doc = {"command": command, "environment": versions(), "threads": args.threads, "chunk_size": args.chunk_size,
           "seconds": round(time.perf_counter() - t0, 1), "port_check": port, **result}
    if args.part:
        args.part.parent.mkdir(parents=True, exist_ok=True)
        args.part.write_text(json.dumps(doc) + "\n")
        return
    finish(doc, args.out)


if __name__ == "__main__":
    main()
