"""The KVTC codec: a KV cache in, bytes out, and back.

Sink tokens, the recent window and sliding-window layers are stored bit-exactly. Every other ("middle") token is
transform-coded (``kvcal.codec.transform``): keys un-rotated at their true positions, the layers of a PCA group
concatenated per token, centred and projected on the basis columns the ratio keeps; each coordinate is rounded
with its calibrated step (``kvcal.codec.quantize``: nothing stored per token) and entropy-coded under its
calibrated symbol model (``kvcal.codec.entropy``: ANS by default, zstd for comparison). The container
(``kvcal.codec.bitstream``) carries a header (``kvcal.codec.geometry``) validated before any payload is read.

Batches may hold sequences of different lengths with left padding: pass the 2-D ``attention_mask``; pad slots are
not stored and come back as zeros (they are masked anyway).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvcal.adapters import KVLayout, ModelAdapter
from kvcal.artifact import Artifact, ratio_key
from kvcal.codec import kernels
from kvcal.codec.bitstream import Limits, read_blob, require_str, section_sizes, write_blob, zstd_frame
from kvcal.codec.entropy import DEFAULT_ENTROPY, ENTROPY_STAGES, entropy_stage
from kvcal.codec.geometry import (
    BLOB_KIND,
    DTYPES,
    CacheGeometry,
    all_finite,
    check_header_keys,
    dtype_name,
    read_geometry,
)
from kvcal.codec.kernels import check_mode as check_kernel_mode
from kvcal.codec.quantize import CoordinateQuantizer
from kvcal.codec.transform import Projection, head_dim, middle_rows, projection_for, scatter_middle
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
        # Finiteness is checked last, while the last section's entropy coding runs on its worker; until then a NaN
        # only meets ``quantize``'s clipping, and the cache is refused before any blob leaves.
        geo = self.geometry(kv, attention_mask, sliding, position_offsets, check_finite=False)
        # Each coded section's entropy coding runs on a worker thread (where the stage releases the GIL) while the
        # next group is projected; the exact tokens are gathered and zstd-compressed here while the last one codes.
        pending: list[tuple[str, Future]] = []
        if geo.middle_tokens:
            for kind in KINDS:
                for g in range(len(self.groups)):
                    rot = self.kernel_rotary_dim(kind, g, kv[0][0].device)
                    if rot is not None:  # fused un-rotate + centre + project + quantize on the device
                        codes = kernels.encode_group(self, kv, geo, kind, g, rot).cpu().numpy()
                    else:
                        rows = middle_rows(kv, geo, self.adapter, kind, self.groups[g], self.group_rotary_dim(kind, g))
                        codes = self.quantize_rows(kind, g, rows)
                    pending.append((f"{kind}{g}", self.entropy_job(self.stage.encode, codes, self.quantizers[(kind, g)].models)))
        on_host = kv[0][0].device.type == "cpu"
        as_part = tensor_bytes if on_host else _flat_bytes  # off the CPU: gathered there, one copy to the host
        exact_parts = []
        for layer, (k, v) in enumerate(kv):
            for t in (k, v):
                if layer in self.layout.exact_layers:
                    exact_parts.append(as_part(t))
                    continue
                for item in range(geo.batch):
                    lo, hi = geo.middle(item)
                    exact_parts.append(as_part(t[item, :, geo.pads[item] : lo]))
                    exact_parts.append(as_part(t[item, :, hi:]))
        exact = b"".join(exact_parts) if on_host else tensor_bytes(torch.cat(exact_parts)) if exact_parts else b""
        exact_stored = zstd_frame(exact, self.zstd_level)
        self.check_finite(kv)
        sections = [("exact", exact)] + [(name, payload.result()) for name, payload in pending]
        compress_flags = [True] + [self.stage.container_zstd] * len(pending)
        header = {"kind": BLOB_KIND, "artifact_id": self.id, "ratio": ratio_key(self.ratio), "entropy": self.stage.name,
                  "model_type": self.artifact.fingerprint["model_type"], **geo.header_fields()}
        return write_blob(header, sections, zstd_level=self.zstd_level, compress=compress_flags,
                          compressed={"exact": exact_stored})

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

    def parse(self, blob: bytes) -> tuple[CacheGeometry, dict[str, bytes]]:
        geo_box: list[CacheGeometry] = []

        def expect(header: dict) -> dict:
            geo_box.append(self.read_geometry(header))
            return self.expected_raw_bytes(geo_box[0])

        _, sections = read_blob(blob, Limits(), expect_raw_bytes=expect)
        return geo_box[0], sections

    @torch.no_grad()
    def decompress(self, blob: bytes, device: str | torch.device = "cpu") -> DynamicCache:
        geo, sections = self.parse(blob)
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

    def decode_tensors(self, geo: CacheGeometry, sections: dict[str, bytes], device: torch.device):
        L = self.layout
        dtype = DTYPES[geo.dtype]
        exact = torch.frombuffer(bytearray(sections["exact"]), dtype=dtype) if sections["exact"] else torch.zeros(0, dtype=dtype)
        # Forged bytes (a recomputed CRC) can hold any bit pattern: a NaN or inf is refused, never returned.
        if not all_finite(exact):
            raise BitstreamError("kvcal blob: its exact tokens hold NaN or inf (forged or corrupted payload)")
        # The entropy stage starts on every coded section now, in worker threads where it releases the GIL, and
        # runs while the exact tokens are copied in below and earlier sections are reconstructed.
        codes = self.decode_sections(geo, sections) if geo.middle_tokens else {}
        try:
            exact = exact.to(device)  # one host-to-device copy; the slices below are views of it
            # Uninitialised: every slot is written below (exact layers whole; coded layers as left padding, which
            # is zeroed, then sinks, middle and window), and zero-filling first would cost a pass over the cache.
            kv = allocate_cache(geo, L, dtype, device)
            pos = 0

            def take(shape) -> torch.Tensor:
                nonlocal pos
                count = math.prod(shape)
                t = exact[pos : pos + count].reshape(shape)
                pos += count
                return t

            for layer in range(L.num_layers):
                for t in kv[layer]:
                    if layer in L.exact_layers:
                        t.copy_(take(t.shape))
                        continue
                    for item in range(geo.batch):
                        lo, hi = geo.middle(item)
                        h, d = t.shape[1], t.shape[3]
                        t[item, :, : geo.pads[item]] = 0
                        t[item, :, geo.pads[item] : lo] = take((h, lo - geo.pads[item], d))
                        t[item, :, hi:] = take((h, geo.seq_len - hi, d))
            for (kind, g), pending in codes.items():
                section_codes = torch.from_numpy(pending.result())
                rot = self.kernel_rotary_dim(kind, g, device)
                if rot is not None:  # fused dequantize + project back + re-rotate, straight into the cache
                    kernels.decode_group(self, kv, geo, kind, g, rot, section_codes.to(device, torch.int32).contiguous())
                    continue
                projection, quantizer = self.placed(kind, g, device)
                coords = quantizer.dequantize(section_codes, device)
                scatter_middle(kv, geo, self.adapter, kind, self.groups[g], projection, coords, L,
                               rotary_dim=self.group_rotary_dim(kind, g))
        finally:
            for pending in codes.values():  # a refused blob leaves no work behind
                pending.cancel()
        return [(k, v) for k, v in kv]

    def decode_sections(self, geo: CacheGeometry, sections: dict[str, bytes]) -> dict[tuple[str, int], Future]:
        """Every coded section's codes ``[n, k]`` int32, as futures in coding order (``entropy_job``)."""
        return {(kind, g): self.entropy_job(self.stage.decode, sections[f"{kind}{g}"], geo.middle_tokens,
                                            self.quantizers[(kind, g)].models)
                for kind in KINDS for g in range(len(self.groups))}

    def entropy_job(self, fn, *args) -> Future:
        """``fn(*args)`` (the entropy stage's encode or decode) as a future: on a worker thread when the stage
        releases the GIL (``rans``), else run here at once (``constriction`` holds the GIL, and a thread then only
        waits out the switch interval: measured no faster)."""
        if self.stage.releases_gil:
            return section_pool().submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - re-raised by result(), as a pool's would be
            future.set_exception(err)
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


_POOL: list[ThreadPoolExecutor] = []


def section_pool() -> ThreadPoolExecutor:
    """The process's entropy-stage threads (as many as torch's intra-op threads, at least 2), made on first use."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max(2, torch.get_num_threads()), thread_name_prefix="kvcal-entropy"))
    return _POOL[0]


os.register_at_fork(after_in_child=_POOL.clear)  # a forked child has none of its parent's threads


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as a flat uint8 tensor on its own device (a copy only where ``t`` is not contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


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
