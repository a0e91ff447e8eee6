"""The KVTC codec: a KV cache in, bytes out, and back.

Sink tokens, the recent window and sliding-window layers are stored bit-exactly. Every other ("middle")
token is transform-coded: keys are un-rotated at their true positions, the layers of a PCA group are
concatenated per token, centred and projected on the basis columns the ratio's allocation keeps; each
group of coordinates is quantized with the type the DP chose (per-token shift and scale), bit-packed per
type, and zstd-coded. Decoding inverts each step and re-applies RoPE at the original positions.

Batches may hold sequences of different lengths with left padding: pass the 2-D ``attention_mask``; pad
slots are not stored and come back as zeros (they are masked anyway).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvcal.adapters import KVLayout, ModelAdapter
from kvcal.artifact import Artifact, ratio_key
from kvcal.codec.bitstream import Limits, read_blob, require_int, require_list, require_str, section_sizes, write_blob
from kvcal.codec.quantize import (
    PAYLOAD_BITS,
    QuantGroup,
    QuantizedGroup,
    dequantize,
    pack_codes,
    packed_size,
    quantize,
    unpack_codes,
)
from kvcal.errors import BitstreamError, KvcalError

BLOB_KIND = "kvcal-kvtc"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_DIM = 1 << 20
KINDS = ("k", "v")


def artifact_id(artifact: Artifact) -> str:
    """Identifies the exact calibration a blob was coded with (model fingerprint, bases and allocations)."""
    h = hashlib.sha256(json.dumps(artifact.meta["fingerprint"], sort_keys=True).encode())
    for name in sorted(artifact.tensors):
        h.update(name.encode())
        h.update(artifact.tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class CacheGeometry:
    """What the header says about the cache; validated against the artifact before any payload is read."""

    batch: int
    seq_len: int
    dtype: str
    layer_lens: tuple[int, ...]  # tokens held per layer (sliding layers may hold fewer)
    sliding: tuple[int, ...]  # per layer: sliding window size, 0 for full attention
    pads: tuple[int, ...]  # left-padding slots per batch item
    offsets: tuple[int, ...]  # position of each item's first real token
    sink: int
    window: int

    def middle(self, item: int) -> tuple[int, int]:
        """Cache indices ``[lo, hi)`` of the transform-coded tokens of one batch item."""
        lo = self.pads[item] + self.sink
        hi = self.seq_len - self.window
        return (lo, hi) if hi > lo else (lo, lo)

    @property
    def middle_tokens(self) -> int:
        return sum(hi - lo for lo, hi in (self.middle(i) for i in range(self.batch)))


class KVTCCodec:
    """Compress and restore KV caches with one calibration artifact at one ratio."""

    def __init__(self, artifact: Artifact, ratio: float, adapter: ModelAdapter, sink: int | None = None,
                 window: int | None = None, zstd_level: int = 3):
        self.artifact = artifact
        self.ratio = artifact.check_ratio(ratio)
        self.adapter = adapter
        self.layout: KVLayout = artifact.layout
        cal = artifact.meta["calibration"]
        self.sink = cal["sink"] if sink is None else sink
        self.window = cal["window"] if window is None else window
        self.zstd_level = zstd_level
        self.id = artifact_id(artifact)
        self.groups = artifact.groups
        self.allocations = {(kind, g): artifact.allocation(kind, g, self.ratio) for kind in KINDS for g in range(len(self.groups))}
        self.bases = {(kind, g): artifact.basis(kind, g).float() for kind in KINDS for g in range(len(self.groups))}
        self.means = {(kind, g): artifact.mean(kind, g).float() for kind in KINDS for g in range(len(self.groups))}

    # --- helpers -------------------------------------------------------------------------------------------
    def _head_dim(self, kind: str) -> int:
        return self.layout.head_dim if kind == "k" else self.layout.v_head_dim

    def _layer_slices(self, kind: str, g: int) -> dict[int, slice]:
        width = self.layout.num_kv_heads * self._head_dim(kind)
        return {layer: slice(i * width, (i + 1) * width) for i, layer in enumerate(self.groups[g])}

    def _positions(self, geo: CacheGeometry, item: int, lo: int, hi: int, device) -> torch.Tensor:
        start = geo.offsets[item] + lo - geo.pads[item]
        return torch.arange(start, start + hi - lo, device=device)[None]

    # --- compress -----------------------------------------------------------------------------------------
    def geometry(self, kv: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor | None,
                 sliding: tuple[int, ...], offsets: list[int] | None) -> CacheGeometry:
        L = self.layout
        if len(kv) != L.num_layers:
            raise KvcalError(f"cache has {len(kv)} layers but the artifact's model has {L.num_layers}; use the matching artifact")
        k0 = kv[L.coded_layers[0]][0] if L.coded_layers else kv[0][0]
        b, _, n, _ = k0.shape
        for i, (k, v) in enumerate(kv):
            want_k = (b, L.num_kv_heads, k.shape[2], L.head_dim)
            want_v = (b, L.num_kv_heads, k.shape[2], L.v_head_dim)
            if tuple(k.shape) != want_k or tuple(v.shape) != want_v:
                raise KvcalError(f"layer {i} cache shapes {tuple(k.shape)}/{tuple(v.shape)} do not match the artifact "
                                 f"(expected {want_k}/{want_v}); use the matching artifact")
            if i in L.coded_layers and k.shape[2] != n:
                raise KvcalError(f"layer {i} holds {k.shape[2]} tokens, layer {L.coded_layers[0]} holds {n}; full-attention layers must agree")
        dtype = next(name for name, dt in DTYPES.items() if dt == k0.dtype) if k0.dtype in DTYPES.values() else None
        if dtype is None:
            raise KvcalError(f"cache dtype {k0.dtype} is not supported; use float32, float16 or bfloat16")
        if attention_mask is not None:
            mask = attention_mask.to("cpu").bool()
            if mask.shape != (b, n):
                raise KvcalError(f"attention_mask shape {tuple(mask.shape)} does not match the cache (batch {b}, {n} tokens)")
            pads = [int(n - mask[i].sum()) for i in range(b)]
            for i, p in enumerate(pads):
                if not bool(mask[i, p:].all()):
                    raise KvcalError("only left padding is supported: each row of attention_mask must be 0s then 1s")
        else:
            pads = [0] * b
        return CacheGeometry(b, n, dtype, tuple(k.shape[2] for k, _ in kv), sliding, tuple(pads),
                             tuple(offsets or [0] * b), self.sink, self.window)

    @torch.no_grad()
    def compress(self, cache, attention_mask: torch.Tensor | None = None, position_offsets: list[int] | None = None) -> bytes:
        """A ``DynamicCache`` (or a list of per-layer ``(keys, values)``) -> bytes."""
        kv, sliding = cache_tensors(cache)
        geo = self.geometry(kv, attention_mask, sliding, position_offsets)
        sections: list[tuple[str, bytes]] = []
        exact_parts = []
        for layer, (k, v) in enumerate(kv):
            for t in (k, v):
                if layer in self.layout.exact_layers:
                    exact_parts.append(tensor_bytes(t))
                    continue
                for item in range(geo.batch):
                    lo, hi = geo.middle(item)
                    exact_parts.append(tensor_bytes(t[item, :, geo.pads[item]:lo]))
                    exact_parts.append(tensor_bytes(t[item, :, hi:]))
        sections.append(("exact", b"".join(exact_parts)))
        if geo.middle_tokens:
            for kind in KINDS:
                for g in range(len(self.groups)):
                    sections.extend(self._encode_group(kind, g, kv, geo))
        header = self._header(geo)
        return write_blob(header, sections, zstd_level=self.zstd_level)

    def _group_rows(self, kind: str, g: int, kv, geo: CacheGeometry) -> torch.Tensor:
        """Middle tokens of every batch item as rows ``[N, p]`` (keys un-rotated), float32."""
        rows = []
        for item in range(geo.batch):
            lo, hi = geo.middle(item)
            if hi <= lo:
                continue
            parts = []
            for layer in self.groups[g]:
                t = kv[layer][0 if kind == "k" else 1][item : item + 1, :, lo:hi]
                t = self.adapter.position_free(kind, t, layer, self._positions(geo, item, lo, hi, t.device))
                parts.append(t[0].permute(1, 0, 2).reshape(hi - lo, -1))
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)

    def encode_rows(self, kind: str, g: int, x: torch.Tensor) -> CodedRows:
        """Rows ``[N, p]`` (keys already un-rotated) -> packed codes and fp16 metadata per quantized group."""
        basis, mean = self.bases[(kind, g)].to(x.device), self.means[(kind, g)].to(x.device)
        alloc = self.allocations[(kind, g)]
        used = used_rank(alloc)
        coords = (x.float() - mean) @ basis[:, :used]
        groups = []
        for q in alloc:
            if q.qtype == "none":
                continue
            qg = quantize(coords[:, q.start : q.start + q.size], q.qtype)
            groups.append((q, pack_codes(qg.codes, PAYLOAD_BITS[q.qtype]), qg.shift, qg.scale))
        return CodedRows(x.shape[0], groups)

    def decode_coords(self, kind: str, g: int, rows: CodedRows, device) -> torch.Tensor:
        """Dequantized PCA coordinates ``[N, used_rank]`` (pruned coordinates are zero)."""
        coords = torch.zeros(rows.n, used_rank(self.allocations[(kind, g)]), device=device)
        for q, packed, shift, scale in rows.groups:
            codes = unpack_codes(packed.to(device), PAYLOAD_BITS[q.qtype], rows.n * q.size).reshape(rows.n, q.size)
            coords[:, q.start : q.start + q.size] = dequantize(QuantizedGroup(codes, shift.to(device), scale.to(device)), q.qtype)
        return coords

    def reconstruct_layer(self, kind: str, g: int, coords: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's slice of the decoded vectors, ``[N, heads, head_dim]`` (keys still un-rotated)."""
        sl = self._layer_slices(kind, g)[layer]
        basis = self.bases[(kind, g)][sl, : coords.shape[1]].to(coords.device)
        x = coords @ basis.T + self.means[(kind, g)][sl].to(coords.device)
        return x.reshape(coords.shape[0], self.layout.num_kv_heads, self._head_dim(kind))

    def _encode_group(self, kind: str, g: int, kv, geo: CacheGeometry) -> list[tuple[str, bytes]]:
        rows = self.encode_rows(kind, g, self._group_rows(kind, g, kv, geo))
        # Sections per quantizer type keep similar symbols together, which zstd codes best.
        meta = [t for q, _, shift, scale in rows.groups for t in ((scale,) if q.qtype == "fp8" else (scale, shift))]
        out = [(f"{kind}{g}.meta", tensor_bytes(torch.cat(meta)) if meta else b"")]
        by_type: dict[str, list[torch.Tensor]] = {}
        for q, packed, _, _ in rows.groups:
            by_type.setdefault(q.qtype, []).append(packed)
        for qtype in sorted(by_type):
            out.append((f"{kind}{g}.{qtype}", tensor_bytes(torch.cat(by_type[qtype]))))
        return out

    def _header(self, geo: CacheGeometry) -> dict:
        return {
            "kind": BLOB_KIND, "artifact_id": self.id, "ratio": ratio_key(self.ratio),
            "model_type": self.artifact.fingerprint["model_type"],
            "batch": geo.batch, "seq_len": geo.seq_len, "dtype": geo.dtype,
            "layer_lens": list(geo.layer_lens), "sliding": list(geo.sliding), "pads": list(geo.pads),
            "offsets": list(geo.offsets), "sink": geo.sink, "window": geo.window,
        }

    # --- decompress ---------------------------------------------------------------------------------------
    def read_geometry(self, header: dict) -> CacheGeometry:
        """Validate every header field against the artifact; any mismatch is a one-line BitstreamError."""
        if header.get("kind") != BLOB_KIND:
            raise BitstreamError("not a kvcal KVTC blob (wrong kind in header)")
        if header.get("artifact_id") != self.id:
            raise BitstreamError(
                f"blob was coded with another artifact (id {str(header.get('artifact_id'))[:12]}…, this codec {self.id[:12]}…); "
                "load the artifact it was made with"
            )
        if header.get("ratio") != ratio_key(self.ratio):
            raise BitstreamError(f"blob was coded at ratio {header.get('ratio')}, this codec is ratio {ratio_key(self.ratio)}; "
                                 "load the codec with that ratio")
        L = self.layout
        b = require_int(header, "batch", 1, MAX_DIM)
        n = require_int(header, "seq_len", 0, MAX_DIM)
        dtype = require_str(header, "dtype", tuple(DTYPES))
        sink = require_int(header, "sink", 0, MAX_DIM)
        window = require_int(header, "window", 0, MAX_DIM)
        lens = require_list(header, "layer_lens", L.num_layers, L.num_layers)
        sliding = require_list(header, "sliding", L.num_layers, L.num_layers)
        pads = require_list(header, "pads", b, b)
        offsets = require_list(header, "offsets", b, b)
        for name, values, hi in (("layer_lens", lens, n), ("sliding", sliding, MAX_DIM), ("pads", pads, n), ("offsets", offsets, 1 << 40)):
            if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= hi for x in values):
                raise BitstreamError(f"kvcal blob header field {name!r} holds an invalid value")
        if any(lens[i] != n for i in L.coded_layers):
            raise BitstreamError("kvcal blob header: full-attention layers must hold seq_len tokens")
        return CacheGeometry(b, n, dtype, tuple(lens), tuple(sliding), tuple(pads), tuple(offsets), sink, window)

    def expected_raw_bytes(self, geo: CacheGeometry) -> dict[str, int]:
        L = self.layout
        esize = DTYPES[geo.dtype].itemsize
        exact = 0
        for layer in range(L.num_layers):
            per_token = L.num_kv_heads * (L.head_dim + L.v_head_dim) * esize
            if layer in L.exact_layers:
                exact += geo.batch * geo.layer_lens[layer] * per_token
            else:
                exact += sum(geo.seq_len - geo.pads[i] - (geo.middle(i)[1] - geo.middle(i)[0]) for i in range(geo.batch)) * per_token
        sizes = {"exact": exact}
        n = geo.middle_tokens
        if n:
            for kind in KINDS:
                for g in range(len(self.groups)):
                    meta, elems = 0, {}
                    for q in self.allocations[(kind, g)]:
                        if q.qtype == "none":
                            continue
                        meta += n * (2 if q.qtype == "fp8" else 4)
                        elems[q.qtype] = elems.get(q.qtype, 0) + n * q.size
                    sizes[f"{kind}{g}.meta"] = meta
                    for qtype, count in elems.items():
                        sizes[f"{kind}{g}.{qtype}"] = packed_size(count, PAYLOAD_BITS[qtype])
        return sizes

    def parse(self, blob: bytes) -> tuple[CacheGeometry, dict[str, bytes]]:
        geo_box: list[CacheGeometry] = []

        def expect(header: dict) -> dict[str, int]:
            geo_box.append(self.read_geometry(header))
            return self.expected_raw_bytes(geo_box[0])

        header, sections = read_blob(blob, Limits(), expect_raw_bytes=expect)
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
                lay = DynamicLayer()
                lay.update(k, v)
            layers.append(lay)
        cache = DynamicCache()
        cache.layers = layers
        return cache

    def decode_tensors(self, geo: CacheGeometry, sections: dict[str, bytes], device: torch.device):
        L = self.layout
        dtype = DTYPES[geo.dtype]
        kv = [[torch.zeros(geo.batch, L.num_kv_heads, geo.layer_lens[layer], hd, dtype=dtype, device=device)
               for hd in (L.head_dim, L.v_head_dim)] for layer in range(L.num_layers)]
        exact = memoryview(sections["exact"])
        pos = 0

        def take(shape) -> torch.Tensor:
            nonlocal pos
            count = 1
            for s in shape:
                count *= s
            nbytes = count * dtype.itemsize
            t = torch.frombuffer(bytearray(exact[pos : pos + nbytes]), dtype=dtype).reshape(shape) if nbytes else torch.zeros(shape, dtype=dtype)
            pos += nbytes
            return t.to(device)

        for layer in range(L.num_layers):
            for t in kv[layer]:
                if layer in L.exact_layers:
                    t.copy_(take(t.shape))
                    continue
                for item in range(geo.batch):
                    lo, hi = geo.middle(item)
                    h, d = t.shape[1], t.shape[3]
                    t[item, :, geo.pads[item]:lo] = take((h, lo - geo.pads[item], d))
                    t[item, :, hi:] = take((h, geo.seq_len - hi, d))
        if geo.middle_tokens:
            for kind in KINDS:
                for g in range(len(self.groups)):
                    self._decode_group(kind, g, sections, geo, kv, device)
        return [(k, v) for k, v in kv]

    def _decode_group(self, kind: str, g: int, sections, geo: CacheGeometry, kv, device) -> None:
        n = geo.middle_tokens
        meta = torch.frombuffer(bytearray(sections[f"{kind}{g}.meta"]), dtype=torch.float16) if sections[f"{kind}{g}.meta"] else None
        offsets: dict[str, int] = {}
        buffers = {name.split(".", 1)[1]: torch.frombuffer(bytearray(data), dtype=torch.uint8)
                   for name, data in sections.items() if name.startswith(f"{kind}{g}.") and data and not name.endswith(".meta")}
        groups, mpos = [], 0
        for q in self.allocations[(kind, g)]:
            if q.qtype == "none":
                continue
            nbytes = packed_size(n * q.size, PAYLOAD_BITS[q.qtype])
            start = offsets.get(q.qtype, 0)
            packed = buffers[q.qtype][start : start + nbytes]
            offsets[q.qtype] = start + nbytes
            scale = meta[mpos : mpos + n]
            mpos += n
            if q.qtype == "fp8":
                shift = torch.zeros_like(scale)
            else:
                shift = meta[mpos : mpos + n]
                mpos += n
            groups.append((q, packed, shift, scale))
        coords = self.decode_coords(kind, g, CodedRows(n, groups), device)
        row = 0
        for item in range(geo.batch):
            lo, hi = geo.middle(item)
            if hi <= lo:
                continue
            for layer in self.groups[g]:
                t = self.reconstruct_layer(kind, g, coords[row : row + hi - lo], layer).permute(1, 0, 2)[None]
                t = self.adapter.at_positions(kind, t, layer, self._positions(geo, item, lo, hi, device))
                target = kv[layer][0 if kind == "k" else 1]
                target[item, :, lo:hi] = t[0].to(target.dtype)
            row += hi - lo

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
            "middle_tokens": geo.middle_tokens,
            "middle_bytes": middle_stored,
            "middle_bf16_bytes": middle_bf16,
            "middle_ratio": middle_bf16 / middle_stored if middle_stored else float("nan"),
            "whole_bf16_bytes": whole_bf16,
            "whole_ratio": whole_bf16 / len(blob),
            "target_ratio": self.ratio,
        }


@dataclass
class CodedRows:
    """``n`` token rows of one PCA group, coded: per quantized group its packed codes, fp16 shift and scale."""

    n: int
    groups: list[tuple[QuantGroup, torch.Tensor, torch.Tensor, torch.Tensor]]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, packed, shift, scale in self.groups
                   for t in ((packed, scale) if _.qtype == "fp8" else (packed, shift, scale)))


def used_rank(alloc: tuple[QuantGroup, ...]) -> int:
    return max((q.start + q.size for q in alloc if q.qtype != "none"), default=0)


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
        if getattr(layer, "keys", None) is None:
            raise KvcalError("the cache has an empty layer; compress a cache after prefill")
        kv.append((layer.keys, layer.values))
        sliding.append(int(getattr(layer, "sliding_window", 0) or 0) if getattr(layer, "is_sliding", False) else 0)
    return kv, tuple(sliding)
