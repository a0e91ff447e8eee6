"""The KVTC codec: a KV cache in, bytes out, and back.

Sink tokens, the recent window and sliding-window layers are stored bit-exactly. Every other ("middle") token is
transform-coded (``kvcal.codec.transform``): keys un-rotated at their true positions, the layers of a PCA group
concatenated per token, centred and projected on the basis columns the ratio keeps; each coordinate is rounded
with its calibrated step (``kvcal.codec.quantize``: nothing stored per token) and entropy-coded under its
calibrated symbol model (``kvcal.codec.entropy``: kvcal's own rANS by default; constriction's ANS and zstd for
comparison). The exact tokens' layout is ``kvcal.codec.exact``. The container (``kvcal.codec.bitstream``) carries a
header (``kvcal.codec.geometry``) validated before any payload is read.

On the CPU the work is split between this thread and the section pool's workers (``section_pool``): a group's rows
are gathered, un-rotated and centred in one compiled pass (``kvcal.codec.rope_rows``) and projected here, while a
worker quantizes and entropy-codes the group before; decoding runs the other way round. Blobs and decoded caches
are the same bits whichever path or thread did the work.

Batches may hold sequences of different lengths with left padding: pass the 2-D ``attention_mask``; pad slots are
not stored and come back as zeros (they are masked anyway).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvcal.adapters import KVLayout, ModelAdapter
from kvcal.artifact import Artifact, ratio_key
from kvcal.codec import kernels
from kvcal.codec.bitstream import (
    Limits,
    read_blob,
    read_blob_lazily,
    require_str,
    section_sizes,
    write_blob,
    zstd_frame,
)
from kvcal.codec.entropy import DEFAULT_ENTROPY, ENTROPY_STAGES, entropy_stage
from kvcal.codec.exact import gather_exact, scatter_exact
from kvcal.codec.geometry import (
    BLOB_KIND,
    DTYPES,
    CacheGeometry,
    all_finite,
    check_header_keys,
    dtype_name,
    host_all_finite,
    host_bits,
    read_geometry,
)
from kvcal.codec.kernels import check_mode as check_kernel_mode
from kvcal.codec.quantize import CoordinateQuantizer
from kvcal.codec.transform import Projection, centred_middle_rows, head_dim, projection_for, scatter_middle
from kvcal.errors import BitstreamError, KvcalError

KINDS = ("k", "v")


def artifact_id(artifact: Artifact) -> str:
    """Identifies the exact calibration a blob was coded with (model fingerprint, bases, steps and models)."""
    h = hashlib.sha256(json.dumps(artifact.meta["fingerprint"], sort_keys=True).encode())
    for name in sorted(artifact.tensors):
        h.update(name.encode())
        h.update(artifact.tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass
class CodedRows:
    """``n`` token rows of one PCA group, coded: the entropy stage's bytes for the kept coordinates."""

    n: int
    payload: bytes

    def nbytes(self) -> int:
        return len(self.payload)


class KVTCCodec:
    """Compress and restore KV caches with one calibration artifact at one ratio."""

    def __init__(self, artifact: Artifact, ratio: float, adapter: ModelAdapter, sink: int | None = None,
                 window: int | None = None, entropy: str = DEFAULT_ENTROPY, zstd_level: int = 3, kernels: str = "auto",
                 device: str | torch.device | None = None):
        self.artifact = artifact
        self.ratio = artifact.check_ratio(ratio)
        self.adapter = adapter
        self.layout: KVLayout = artifact.layout
        cal = artifact.meta["calibration"]
        self.sink = cal["sink"] if sink is None else sink
        self.window = cal["window"] if window is None else window
        if self.sink < 0 or self.window < 0:
            raise KvcalError(f"sink and window must be >= 0, got {self.sink} and {self.window}")
        self.stage = entropy_stage(entropy)
        self.zstd_level = zstd_level
        self.id = artifact_id(artifact)
        self.groups = artifact.groups
        self.quantizers: dict[tuple[str, int], CoordinateQuantizer] = {}
        self.projections: dict[tuple[str, int], Projection] = {}
        for kind in KINDS:
            for g in range(len(self.groups)):
                q = CoordinateQuantizer.from_table(artifact.steps(kind, g, self.ratio))
                self.quantizers[(kind, g)] = q
                self.projections[(kind, g)] = projection_for(artifact, kind, g, q.kept)
        # ``kernels``: "auto" = the fused Triton kernels (kvcal.codec.kernels) for CUDA tensors when triton imports,
        # "triton" = always, "torch" = never. ``_placed``: projections and steps already on each device used.
        self.kernels = check_kernel_mode(kernels)  # the argument shadows the kernels module here
        self._placed: dict[tuple[str, int, torch.device], tuple[Projection, CoordinateQuantizer]] = {}
        self._rotary: dict[tuple[str, int], int | None] = {}
        if device is not None:
            self.to(device)

    def to(self, device: str | torch.device) -> KVTCCodec:
        """Place every projection and step on ``device`` now (they are otherwise placed on first use there)."""
        for kind in KINDS:
            for g in range(len(self.groups)):
                self.placed(kind, g, torch.device(device))
        return self

    def placed(self, kind: str, g: int, device: torch.device) -> tuple[Projection, CoordinateQuantizer]:
        """Group ``g``'s projection and quantizer with their tensors on ``device``, copied there once."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (kind, g, device)
        if key not in self._placed:
            self._placed[key] = (self.projections[(kind, g)].to(device), self.quantizers[(kind, g)].to(device))
        return self._placed[key]

    def group_rotary_dim(self, kind: str, g: int) -> int | None:
        """Rotary dims every layer of group ``g`` shares (0: none), or None when the adapter's ``at_positions`` is
        not plain half-split RoPE with one table for the group (the group is then re-positioned layer by layer)."""
        if (kind, g) not in self._rotary:  # asked per layer and step by KVTCCache: answered once
            self._rotary[(kind, g)] = kernels.group_rotary_dim(self.adapter, kind, self.groups[g])
        return self._rotary[(kind, g)]

    def kernel_rotary_dim(self, kind: str, g: int, device: torch.device) -> int | None:
        """Rotary dims for the fused kernels when they code this group on ``device``; None = the torch path."""
        if not kernels.use_kernels(self.kernels, device):
            return None
        return self.group_rotary_dim(kind, g)

    # --- rows <-> coded bytes (also what KVTCCache stores per block) -----------------------------------------
    def quantize_rows(self, kind: str, g: int, rows: torch.Tensor) -> np.ndarray:
        """Position-free rows ``[n, p]`` -> int32 codes ``[n, k]`` of their kept coordinates, on the host (where
        the entropy stage runs)."""
        projection, quantizer = self.placed(kind, g, rows.device)
        return quantizer.quantize(projection.project(rows)).numpy()

    def encode_rows(self, kind: str, g: int, rows: torch.Tensor) -> CodedRows:
        """Position-free rows ``[n, p]`` -> the entropy stage's bytes for their kept coordinates."""
        codes = self.quantize_rows(kind, g, rows)
        return CodedRows(rows.shape[0], self.stage.encode(codes, self.quantizers[(kind, g)].models))

    def reconstruct_layer(self, kind: str, g: int, coords: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's slice of the decoded vectors, ``[n, heads, head_dim]`` (keys still position-free)."""
        projection = self.placed(kind, g, coords.device)[0]
        return projection.reconstruct_layer(coords, layer, self.layout.num_kv_heads, head_dim(self.layout, kind))

    # --- compress -----------------------------------------------------------------------------------------
    def geometry(self, kv: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor | None,
                 sliding: tuple[int, ...], offsets: list[int] | None, check_finite: bool = True) -> CacheGeometry:
        L = self.layout
        if len(kv) != L.num_layers:
            raise KvcalError(f"cache has {len(kv)} layers but the artifact's model has {L.num_layers}; use the matching artifact")
        k0 = kv[L.coded_layers[0]][0] if L.coded_layers else kv[0][0]
        b, _, n, _ = k0.shape
        if n < 1:
            raise KvcalError("the cache holds no tokens; compress a cache after prefill")
        for i, (k, v) in enumerate(kv):
            want_k = (b, L.num_kv_heads, k.shape[2], L.head_dim)
            want_v = (b, L.num_kv_heads, k.shape[2], L.v_head_dim)
            if tuple(k.shape) != want_k or tuple(v.shape) != want_v:
                raise KvcalError(f"layer {i} cache shapes {tuple(k.shape)}/{tuple(v.shape)} do not match the artifact "
                                 f"(expected {want_k}/{want_v}); use the matching artifact")
            if i in L.coded_layers and (k.shape[2] != n or sliding[i]):
                raise KvcalError(f"layer {i} holds {k.shape[2]} tokens, layer {L.coded_layers[0]} holds {n}; full-attention layers must agree")
            if k.shape[2] > n:
                raise KvcalError(f"layer {i} holds {k.shape[2]} tokens, more than the {n} of the full-attention layers")
            if k.dtype != k0.dtype or v.dtype != k0.dtype:
                raise KvcalError(f"layer {i} is {k.dtype}/{v.dtype}, layer {L.coded_layers[0] if L.coded_layers else 0} "
                                 f"is {k0.dtype}; every layer must share one dtype")
        if check_finite:
            self.check_finite(kv)
        dtype = dtype_name(k0.dtype)
        if dtype is None:
            raise KvcalError(f"cache dtype {k0.dtype} is not supported; use float32, float16 or bfloat16")
        if attention_mask is not None:
            mask = attention_mask.to("cpu").bool()
            if mask.shape != (b, n):
                raise KvcalError(f"attention_mask shape {tuple(mask.shape)} does not match the cache (batch {b}, {n} tokens)")
            pads = [int(n - mask[i].sum()) for i in range(b)]
            for i, p in enumerate(pads):
                if not bool(mask[i, p:].all()) or p >= n:
                    raise KvcalError("only left padding is supported, with one real token per row at least: "
                                     "each row of attention_mask must be 0s then 1s")
        else:
            pads = [0] * b
        if offsets is not None and (len(offsets) != b or any(not isinstance(o, int) or o < 0 for o in offsets)):
            raise KvcalError(f"position_offsets must be {b} non-negative integers, one per batch item")
        return CacheGeometry(b, n, dtype, tuple(k.shape[2] for k, _ in kv), sliding, tuple(pads),
                             tuple(offsets or [0] * b), self.sink, self.window)

    @staticmethod
    def check_finite(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, (k, v) in enumerate(kv):
            if not (all_finite(k) and all_finite(v)):
                raise KvcalError(f"layer {i} of the cache holds NaN or inf; kvcal stores finite caches only")

    @torch.no_grad()
    def compress(self, cache, attention_mask: torch.Tensor | None = None, position_offsets: list[int] | None = None) -> bytes:
        """A ``DynamicCache`` (or a list of per-layer ``(keys, values)``) -> bytes."""
        kv, sliding = cache_tensors(cache)
        # Finiteness is checked as the values are read (the CPU path) or at the end; until then a NaN only meets
        # ``quantize``'s clipping, and the cache is refused before any blob leaves.
        geo = self.geometry(kv, attention_mask, sliding, position_offsets, check_finite=False)
        # Work runs on the section pool's threads beside the main thread's: the exact tokens' zstd frame while the
        # first group is gathered, and each coded section's quantizing and entropy coding (where the stage
        # releases the GIL) while the next group is gathered and projected.
        exact_t = gather_exact(kv, geo, self.layout)
        exact = host_bits(exact_t) if exact_t.device.type == "cpu" else tensor_bytes(exact_t)
        exact_job = section_pool().submit(zstd_frame, exact, self.zstd_level)
        pending: list[tuple[str, Future]] = []
        middle_checked = True  # whether every middle value was checked finite as it was read
        if geo.middle_tokens:
            device = kv[0][0].device
            for kind in KINDS:
                for g in range(len(self.groups)):
                    rot = self.kernel_rotary_dim(kind, g, device)
                    if rot is not None:  # fused un-rotate + centre + project + quantize on the device
                        codes = kernels.encode_group(self, kv, geo, kind, g, rot).cpu().numpy()
                        job = self.entropy_job(self.stage.encode, codes, self.quantizers[(kind, g)].models)
                        middle_checked = False
                    else:
                        projection, quantizer = self.placed(kind, g, device)
                        rows, finite = centred_middle_rows(kv, geo, self.adapter, kind, self.groups[g],
                                                           self.group_rotary_dim(kind, g), projection.mean)
                        if finite is False:
                            self.check_finite(kv)  # names the layer
                        middle_checked = middle_checked and bool(finite)
                        # Quantizing rides with the entropy coding on the worker, beside the next group's matmul.
                        job = self.entropy_job(self.encode_coordinates, quantizer, projection.project_centred(rows))
                    pending.append((f"{kind}{g}", job))
        # Finite middle values were checked on the way (the CPU path), the exact tokens here; left padding (never
        # stored) and the other paths fall back to checking the whole cache, as ever.
        exact_finite = host_all_finite(exact_t) if exact_t.device.type == "cpu" else all_finite(exact_t)
        if not (middle_checked and exact_finite and not any(geo.pads)):
            self.check_finite(kv)
        exact_stored = exact_job.result()
        sections = [("exact", exact)] + [(name, payload.result()) for name, payload in pending]
        compress_flags = [True] + [self.stage.container_zstd] * len(pending)
        header = {"kind": BLOB_KIND, "artifact_id": self.id, "ratio": ratio_key(self.ratio), "entropy": self.stage.name,
                  "model_type": self.artifact.fingerprint["model_type"], **geo.header_fields()}
        return write_blob(header, sections, zstd_level=self.zstd_level, compress=compress_flags,
                          compressed={"exact": exact_stored})

    def encode_coordinates(self, quantizer: CoordinateQuantizer, coords: torch.Tensor) -> bytes:
        """Kept coordinates ``[n, k]`` -> the entropy stage's bytes (quantized here: on the worker, no GIL)."""
        return self.stage.encode(quantizer.quantize(coords).numpy(), quantizer.models)

    # --- decompress ---------------------------------------------------------------------------------------
    def read_geometry(self, header: dict) -> CacheGeometry:
        """Validate every header field against the codec and the artifact; any mismatch is a one-line BitstreamError."""
        check_header_keys(header)
        if header.get("kind") != BLOB_KIND:
            raise BitstreamError("not a kvcal KVTC blob (wrong kind in header)")
        model_type = self.artifact.fingerprint["model_type"]
        if header.get("model_type") != model_type:
            raise BitstreamError(f"blob holds a cache of a {str(header.get('model_type'))[:40]!r} model, this codec is for "
                                 f"{model_type!r}; load the artifact of the model that made it")
        if header.get("artifact_id") != self.id:
            raise BitstreamError(
                f"blob was coded with another artifact (id {str(header.get('artifact_id'))[:12]}…, this codec {self.id[:12]}…); "
                "load the artifact it was made with"
            )
        if header.get("ratio") != ratio_key(self.ratio):
            raise BitstreamError(f"blob was coded at ratio {str(header.get('ratio'))[:20]}, this codec is ratio "
                                 f"{ratio_key(self.ratio)}; load the codec with that ratio")
        entropy = require_str(header, "entropy", tuple(ENTROPY_STAGES))
        if entropy != self.stage.name:
            raise BitstreamError(f"blob was entropy-coded with {entropy!r}, this codec uses {self.stage.name!r}; "
                                 f"load the codec with entropy={entropy!r}")
        return read_geometry(header, self.layout, self.sink, self.window)

    def expected_raw_bytes(self, geo: CacheGeometry) -> dict[str, int | tuple[int, int]]:
        L = self.layout
        esize = DTYPES[geo.dtype].itemsize
        per_token = L.num_kv_heads * (L.head_dim + L.v_head_dim) * esize
        exact = 0
        coded_exact_tokens = sum(geo.exact_tokens(i) for i in range(geo.batch))  # once: batch may be ~10^5 items
        for layer in range(L.num_layers):
            if layer in L.exact_layers:
                exact += geo.batch * geo.layer_lens[layer] * per_token
            else:
                exact += coded_exact_tokens * per_token
        sizes: dict[str, int | tuple[int, int]] = {"exact": exact}
        n = geo.middle_tokens
        if n:
            for kind in KINDS:
                for g in range(len(self.groups)):
                    models = self.quantizers[(kind, g)].models
                    sizes[f"{kind}{g}"] = self.stage.raw_size_bounds(n, len(models), models.min_token_bits)
        return sizes

    def parse(self, blob: bytes, lazy: bool = False) -> tuple[CacheGeometry, Mapping[str, bytes]]:
        """The blob's geometry and its sections' raw bytes (``lazy``: each decoded on first lookup)."""
        geo_box: list[CacheGeometry] = []

        def expect(header: dict) -> dict:
            geo_box.append(self.read_geometry(header))
            return self.expected_raw_bytes(geo_box[0])

        _, sections = (read_blob_lazily if lazy else read_blob)(blob, Limits(), expect_raw_bytes=expect)
        return geo_box[0], sections

    @torch.no_grad()
    def decompress(self, blob: bytes, device: str | torch.device = "cpu") -> DynamicCache:
        geo, sections = self.parse(blob, lazy=True)
        kv = self.decode_tensors(geo, sections, torch.device(device))
        layers = []
        for layer, (k, v) in enumerate(kv):
            if geo.sliding[layer]:
                lay = DynamicSlidingWindowLayer(sliding_window=geo.sliding[layer])
                lay.update(k, v)
                lay.cumulative_length = geo.seq_len
            else:
                # The decoded tensors become the layer's own: ``update`` would concatenate them onto an empty
                # tensor, one more copy of the whole cache.
                lay = DynamicLayer()
                lay.lazy_initialization(k, v)
                lay.keys, lay.values = k, v
            layers.append(lay)
        cache = DynamicCache()
        cache.layers = layers
        return cache

    def decode_tensors(self, geo: CacheGeometry, sections: Mapping[str, bytes], device: torch.device):
        L = self.layout
        dtype = DTYPES[geo.dtype]
        # Two threads' work from the start, no more (torch's matmuls take both cores next): one worker decompresses
        # the exact tokens' zstd frame, then entropy-decodes the coded sections after the first, in turn, while this
        # thread decodes the first (where the stage releases the GIL; else all of them here, in turn).
        coded = {(kind, g): sections[f"{kind}{g}"] for kind in KINDS for g in range(len(self.groups))
                 if geo.middle_tokens}
        exact_job: Future = Future()
        codes = self.decode_sections(geo, coded, device, first=(exact_job, sections.__getitem__, ("exact",)))
        try:
            if codes:
                next(iter(codes.values())).result()
            raw = exact_job.result()
            exact = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.zeros(0, dtype=dtype)
            # Forged bytes (a recomputed CRC) can hold any bit pattern: a NaN or inf is refused, never returned.
            if not host_all_finite(exact):
                raise BitstreamError("kvcal blob: its exact tokens hold NaN or inf (forged or corrupted payload)")
            # Uninitialised: every slot is written below (exact layers whole; coded layers as left padding, which
            # is zeroed, then sinks, middle and window), and zero-filling first would cost a pass over the cache.
            kv = allocate_cache(geo, L, dtype, device)
            scatter_exact(kv, exact.to(device), geo, L)  # one host-to-device copy where the cache is elsewhere
            for (kind, g), pending in codes.items():
                decoded = pending.result()
                rot = self.kernel_rotary_dim(kind, g, device)
                if rot is not None:  # fused dequantize + project back + re-rotate, straight into the cache
                    kernels.decode_group(self, kv, geo, kind, g, rot, decoded.to(device, torch.int32).contiguous())
                    continue
                projection, quantizer = self.placed(kind, g, device)
                coords = decoded if device.type == "cpu" else quantizer.dequantize(decoded, device)
                scatter_middle(kv, geo, self.adapter, kind, self.groups[g], projection, coords, L,
                               rotary_dim=self.group_rotary_dim(kind, g))
        finally:
            for pending in (exact_job, *codes.values()):  # a refused blob leaves no work behind
                pending.cancel()
        return [(k, v) for k, v in kv]

    def decode_sections(self, geo: CacheGeometry, coded: Mapping[tuple[str, int], bytes], device: torch.device,
                        first: tuple[Future, Callable, tuple] | None = None) -> dict[tuple[str, int], Future]:
        """Every coded section (``coded``: its bytes by ``(kind, group)``), as futures in coding order: its float32
        coordinates ``[n, k]`` where it is reconstructed on the CPU by torch (dequantized with it), else its int32
        codes. The first is decoded on the calling thread when its result is first asked for; the others, after
        ``first`` (a future and the call that settles it), in turn on one worker of the section pool where the
        stage releases the GIL, else here at once."""
        calls = [first] if first is not None else []
        jobs: dict[tuple[str, int], Future] = {}
        for i, ((kind, g), data) in enumerate(coded.items()):
            args = (kind, g, data, geo.middle_tokens, device.type == "cpu" and self.kernel_rotary_dim(kind, g, device) is None)
            if i == 0:
                jobs[(kind, g)] = RunWhenAsked(self.decode_section, *args)
            elif self.stage.releases_gil:
                jobs[(kind, g)] = Future()
                calls.append((jobs[(kind, g)], self.decode_section, args))
            else:
                jobs[(kind, g)] = self.entropy_job(self.decode_section, *args)
        if calls:
            section_pool().submit(_settle_in_turn, calls)
        return jobs

    def decode_section(self, kind: str, g: int, data: bytes, n: int, dequantize: bool) -> torch.Tensor:
        quantizer = self.quantizers[(kind, g)]
        codes = torch.from_numpy(self.stage.decode(data, n, quantizer.models))
        return quantizer.dequantize(codes, "cpu") if dequantize else codes

    def entropy_job(self, fn, *args) -> Future:
        """``fn(*args)`` (the entropy stage's encode or decode) as a future: on a worker thread when the stage
        releases the GIL (``rans``), else run here at once (``constriction`` holds the GIL, and a thread then only
        waits out the switch interval: measured no faster)."""
        if self.stage.releases_gil:
            return section_pool().submit(fn, *args)
        future: Future = Future()
        _settle(future, fn, args)
        return future

    # --- accounting ---------------------------------------------------------------------------------------
    def stats(self, blob: bytes) -> dict:
        """Bytes per section and compression ratios against bf16, for the middle tokens and the whole cache."""
        geo, _ = self.parse(blob)
        sizes = section_sizes(blob)
        L = self.layout
        middle_stored = sum(s["stored"] for name, s in sizes.items() if name != "exact")
        per_token_bf16 = L.num_kv_heads * (L.head_dim + L.v_head_dim) * 2
        middle_bf16 = geo.middle_tokens * per_token_bf16 * len(L.coded_layers)
        whole_bf16 = sum(geo.layer_lens[layer] * geo.batch for layer in range(L.num_layers)) * per_token_bf16
        whole_bf16 -= sum(geo.pads) * per_token_bf16 * len(L.coded_layers)
        return {
            "sections": sizes,
            "total_bytes": len(blob),
            "header_bytes": len(blob) - sum(s["stored"] for s in sizes.values()),
            "middle_tokens": geo.middle_tokens,
            "middle_bytes": middle_stored,
            "middle_bf16_bytes": middle_bf16,
            "middle_ratio": middle_bf16 / middle_stored if middle_stored else float("nan"),
            "whole_bf16_bytes": whole_bf16,
            "whole_ratio": whole_bf16 / len(blob),
            "target_ratio": self.ratio,
            "entropy": self.stage.name,
        }


def _settle(future: Future, fn: Callable, args: tuple) -> None:
    """Give ``future`` the result of ``fn(*args)``, or its exception (re-raised by ``result()``, as a pool's)."""
    try:
        future.set_result(fn(*args))
    except BaseException as err:  # noqa: BLE001 - handed to whoever asks for the result
        future.set_exception(err)


def _settle_in_turn(calls: list[tuple[Future, Callable, tuple]]) -> None:
    """Run each ``(future, fn, args)`` in order, settling its future (skipped if cancelled before its turn)."""
    for future, fn, args in calls:
        if future.set_running_or_notify_cancel():
            _settle(future, fn, args)


class RunWhenAsked(Future):
    """A future computed on the thread that first asks for its result (and never, if cancelled before)."""

    def __init__(self, fn, *args) -> None:
        super().__init__()
        self._call: tuple | None = (fn, args)

    def result(self, timeout: float | None = None):
        if self._call is not None and self.set_running_or_notify_cancel():
            fn, args = self._call
            self._call = None
            _settle(self, fn, args)
        return super().result(timeout)


_POOL: list[ThreadPoolExecutor] = []


def section_pool() -> ThreadPoolExecutor:
    """The process's entropy-stage threads (as many as torch's intra-op threads, at least 2), made on first use."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max(2, torch.get_num_threads()), thread_name_prefix="kvcal-entropy"))
    return _POOL[0]


os.register_at_fork(after_in_child=_POOL.clear)  # a forked child has none of its parent's threads


def allocate_cache(geo: CacheGeometry, L: KVLayout, dtype: torch.dtype, device: torch.device) -> list[list[torch.Tensor]]:
    """Uninitialised per-layer ``[keys, values]`` of the cache a (validated) header declares. The header's limits
    bound the size, but a blob may still declare more than this machine holds (a zstd section of zeros codes a
    million tokens in a few kilobytes): that is a one-line refusal, not an allocator traceback."""
    shapes = [(geo.batch, L.num_kv_heads, geo.layer_lens[layer], d) for layer in range(L.num_layers)
              for d in (L.head_dim, L.v_head_dim)]
    try:
        flat = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
    except (RuntimeError, MemoryError) as err:  # torch's allocators raise RuntimeError (OutOfMemoryError on CUDA)
        total = sum(math.prod(shape) for shape in shapes) * dtype.itemsize
        raise BitstreamError(f"kvcal blob declares a {total / 2**30:.2f} GiB cache, which cannot be allocated on "
                             f"{device} ({str(err).splitlines()[0][:80]})") from None
    return [flat[i : i + 2] for i in range(0, len(flat), 2)]


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def cache_tensors(cache) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[int, ...]]:
    """``(keys, values)`` per layer and each layer's sliding window (0 = full attention)."""
    if isinstance(cache, (list, tuple)):
        return [(k, v) for k, v in cache], tuple(0 for _ in cache)
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise KvcalError(f"cannot compress a {type(cache).__name__}; pass a DynamicCache or a list of (keys, values)")
    kv, sliding = [], []
    for layer in layers:
        if getattr(layer, "keys", None) is None or not getattr(layer, "is_initialized", True):
            raise KvcalError("the cache has an empty layer; compress a cache after prefill")
        kv.append((layer.keys, layer.values))
        sliding.append(int(getattr(layer, "sliding_window", 0) or 0) if getattr(layer, "is_sliding", False) else 0)
    return kv, tuple(sliding)
