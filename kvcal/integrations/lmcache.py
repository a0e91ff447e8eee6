"""LMCache's ``kvtc`` serde: kvcal's KVTC codec behind LMCache's ``Serializer``/``Deserializer`` ABCs.

Importing this module registers the serde type ``"kvtc"`` with LMCache (``register_serde_factory``), so an L2
adapter spec can name it::

    {"type": "fs", "base_path": "/cache",
     "serde": {"type": "kvtc", "artifact": "/models/llama/kvcal", "ratio": 32, "chunk_size": 256}}

LMCache forwards every key of the ``serde`` dict except ``type`` to the factory (``KvtcSerdeConfig`` lists and
checks them), and wraps the pair in its ``AsyncSerdeProcessor`` (``max_workers`` threads).

What a chunk is. LMCache hands a serde one object per chunk of ``chunk_size`` tokens (256 by default; the last
chunk of a request may be shorter), laid out ``[2, layers, tokens, kv_heads * head_dim]`` (keys, then values), with
the keys as the engine cached them: *after* RoPE. The object key (``ObjectKey``: chunk hash, model name, kv rank,
object group, salt) carries no position. A chunk is coded whole: no sink or window inside it, those are the
engine's business.

Positions. kvcal's basis is fitted on keys with RoPE undone, which needs each token's position. Chunk ``i`` of a
request covers tokens ``[i * chunk_size, (i + 1) * chunk_size)`` (``lmcache.v1.distributed.api``), so a chunk's
first position is a multiple of ``chunk_size``; only the index is unknown. The serializer takes it from
``MemoryObj.metadata.cached_positions`` when LMCache filled that field, and otherwise *estimates* it: it undoes
RoPE as if the chunk started at 0, which leaves every key rotated by the chunk's unknown offset, and picks the
multiple of ``chunk_size`` whose rotation best aligns the chunk's mean key with the artifact's pre-RoPE mean
(``estimate_offset``). The offset used is written into the chunk, and decoding re-applies RoPE at that same
offset, so a wrong estimate can only cost accuracy at the ratio, never return keys at other positions than they
were coded at. The alternative needs no position at all: an artifact calibrated on post-RoPE keys
(``kvcal.integrations.post_rope``), used automatically when the artifact is marked so; its cost in ratio is
measured by ``scripts/bench_vs_lmcache.py``.

A serialised chunk is self-describing and checksummed: a fixed header (magic, version, key frame, position
source, dtype, shape, payload length), kvcal's own blob (which names the artifact id, ratio, model type and
offsets, and carries its own CRC), then a CRC32 over all of it. A chunk coded with another artifact, for another
model, at another ratio or corrupted in any byte is refused with a one-line ``KvcalError``; ``dst`` is written
only after the whole chunk has decoded.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from kvcal.codec.entropy import DEFAULT_ENTROPY
from kvcal.codec.geometry import DTYPES, dtype_name
from kvcal.codec.kvtc import KVTCCodec
from kvcal.errors import ArtifactError, BitstreamError, KvcalError
from kvcal.integrations.post_rope import POST_ROPE, PRE_ROPE, PostRopeAdapter, key_frame

try:
    from lmcache.v1.distributed.serde.async_processor import AsyncSerdeProcessor
    from lmcache.v1.distributed.serde.base import Deserializer, SerdeProcessor, Serializer
    from lmcache.v1.distributed.serde.factory import get_registered_serde_types, register_serde_factory
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"kvcal.integrations.lmcache needs LMCache ({e}); install it with pip install 'kvcal[lmcache]'") from None

SERDE_TYPE = "kvtc"
MAGIC = b"KVLC"
VERSION = 1
# magic, version, key frame, position source, dtype, layers, tokens, hidden, payload bytes
_HEADER = struct.Struct("<4sBBBBHIII")
_CRC = struct.Struct("<I")
FRAMES = (PRE_ROPE, POST_ROPE)
POSITION_SOURCES = ("none", "metadata", "estimate", "zero")  # "none": post-RoPE, no position used
DTYPE_CODES = tuple(DTYPES)  # codes index kvcal's dtype names
# Room for kvcal's blob header and its section table beyond the chunk's own bytes in its dtype.
ESTIMATE_MARGIN = 16384


class SerdeConfigError(KvcalError):
    """The ``kvtc`` serde's settings (LMCache's ``serde`` dict) are missing, unknown or of the wrong type."""


class ChunkLayoutError(KvcalError):
    """A chunk's shape or dtype does not match the artifact's model."""


@dataclass(frozen=True)
class KvtcSerdeConfig:
    """The ``kvtc`` serde's settings, as LMCache passes them (the adapter spec's ``serde`` dict less ``type``).

    ``artifact``: a model directory holding ``kvcal/``, an artifact directory or ``kvcal.safetensors``; RoPE is
    rebuilt from the ``config.json`` beside it, or from ``model``'s (a model directory). ``ratio``: one of the
    artifact's ratios (default: its smallest).
    ``chunk_size``: LMCache's chunk size (chunk offsets are its multiples). ``positions``: ``"auto"`` (metadata,
    else estimate), ``"estimate"`` or ``"zero"`` (un-rotate as if every chunk began at 0). ``max_position``: the
    estimate's search range (default: the model's ``max_position_embeddings``). ``entropy``: ``"rans"`` (default),
    ``"ans"`` or ``"zstd"``. ``max_workers``: LMCache's thread pool for this serde.
    """

    artifact: str
    model: str | None = None
    ratio: float | None = None
    chunk_size: int = 256
    positions: str = "auto"
    max_position: int | None = None
    entropy: str = DEFAULT_ENTROPY
    max_workers: int = 1

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> KvtcSerdeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise SerdeConfigError(f"kvtc serde: unknown setting(s) {', '.join(map(repr, unknown))}; "
                                   f"known: {', '.join(sorted(known))}")
        if not isinstance(kwargs.get("artifact"), (str, Path)) or not str(kwargs["artifact"]):
            raise SerdeConfigError("kvtc serde needs \"artifact\": the path of the model's kvcal artifact "
                                   "(run `kvcal calibrate` on the model)")

        def number(name, kind, minimum):
            value = kwargs.get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise SerdeConfigError(f"kvtc serde: {name} must be a number, got {type(value).__name__}")
            try:
                out = kind(value)
            except (ValueError, OverflowError):
                raise SerdeConfigError(f"kvtc serde: {name} must be a number, got {str(value)[:40]!r}") from None
            if not math.isfinite(out) or out < minimum or (kind is int and out != float(value)):
                raise SerdeConfigError(f"kvtc serde: {name} must be {'an integer ' if kind is int else ''}>= {minimum}, got {value!r}")
            return out

        cfg = cls(
            artifact=str(kwargs["artifact"]),
            model=None if kwargs.get("model") is None else str(kwargs["model"]),
            ratio=number("ratio", float, 1.0),
            chunk_size=number("chunk_size", int, 1) or cls.chunk_size,
            positions=str(kwargs.get("positions", cls.positions)),
            max_position=number("max_position", int, 1),
            entropy=str(kwargs.get("entropy", cls.entropy)),
            max_workers=number("max_workers", int, 1) or cls.max_workers,
        )
        if cfg.positions not in ("auto", "estimate", "zero"):
            raise SerdeConfigError(f"kvtc serde: positions must be auto, estimate or zero, got {cfg.positions[:40]!r}")
        return cfg

    def build_codec(self) -> KVTCCodec:
        """The codec for these settings: the artifact at the ratio, sink 0 and window 0 (chunks are coded whole)."""
        from kvcal.loading import load

        if self.model is None:
            codec = load(self.artifact, ratio=self.ratio, sink=0, window=0, entropy=self.entropy)
        else:
            codec = _codec_with_model_config(self.artifact, self.model, self.ratio, self.entropy)
        if key_frame(codec.artifact) == POST_ROPE:
            codec.adapter = PostRopeAdapter(codec.adapter)
        return codec


def _codec_with_model_config(artifact_path: str, model_dir: str, ratio: float | None, entropy: str) -> KVTCCodec:
    from transformers import AutoConfig

    from kvcal.adapters import adapter_for_config
    from kvcal.artifact import Artifact

    artifact = Artifact.load(artifact_path)
    if not (Path(model_dir) / "config.json").is_file():
        raise SerdeConfigError(f"kvtc serde: no config.json in model directory {model_dir}")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model_type = config.get_text_config(decoder=True).model_type
    if model_type != artifact.fingerprint["model_type"]:
        raise ArtifactError(f"artifact was made for a {artifact.fingerprint['model_type']} model, but {model_dir} holds a "
                            f"{model_type}; pass the matching model")
    ratio = min(artifact.ratios) if ratio is None else ratio
    return KVTCCodec(artifact, ratio, adapter_for_config(config), 0, 0, entropy)


@torch.no_grad()
def estimate_offset(codec: KVTCCodec, keys: list[torch.Tensor], candidates: torch.Tensor) -> int:
    """The candidate first position of a chunk whose post-RoPE ``keys`` (``[1, heads, tokens, head_dim]`` per
    coded layer, in ``codec.layout.coded_layers`` order) align best with the artifact's pre-RoPE key mean.

    Keys un-rotated as if the chunk began at 0 are the pre-RoPE keys rotated by the chunk's true offset ``p``; so
    is their mean, ``R(p) k̄``. The score of a candidate ``c`` is ``Σ <R(p) k̄, R(c) μ>`` over layers and heads.
    """
    adapter, layout = codec.adapter, codec.layout
    n = keys[0].shape[2]
    rel = torch.arange(n)[None]
    score = torch.zeros(candidates.numel(), dtype=torch.float64)
    for g, layers in enumerate(codec.groups):
        mean = codec.artifact.mean("k", g).float()
        width = layout.num_kv_heads * layout.head_dim
        for i, layer in enumerate(layers):
            k = keys[layout.coded_layers.index(layer)]
            m = adapter.unrotate_keys(k, layer, rel.to(k.device)).mean(2)[0].cpu()  # [heads, d]
            mu = mean[i * width : (i + 1) * width].reshape(1, layout.num_kv_heads, 1, layout.head_dim)
            rotated = adapter.rotate_keys(mu.expand(1, -1, candidates.numel(), -1).contiguous(), layer, candidates[None])
            score += torch.einsum("hpd,hd->p", rotated[0].double(), m.double())
    return int(candidates[int(score.argmax())])


def chunk_view(t: torch.Tensor, codec: KVTCCodec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """LMCache's ``[2, L, T, heads * head_dim]`` -> per layer ``(keys, values)`` ``[1, heads, T, head_dim]`` views."""
    L = codec.layout
    if L.head_dim != L.v_head_dim or L.exact_layers:
        raise ChunkLayoutError("the kvtc serde codes models whose keys and values share a head size and whose layers "
                               "all use full attention")
    want = (2, L.num_layers, L.num_kv_heads * L.head_dim)
    if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want:
        raise ChunkLayoutError(f"chunk of shape {tuple(t.shape)} does not match the artifact's model (expected "
                               f"[2, {want[1]}, tokens, {want[2]}]); configure the serde with this model's artifact")
    if t.shape[2] < 1:
        raise ChunkLayoutError("empty chunk: it holds no tokens")
    if t.dtype not in DTYPES.values():
        raise ChunkLayoutError(f"chunk dtype {t.dtype} is not supported; kvtc codes float32, float16 and bfloat16")
    n = t.shape[2]
    return [tuple(t[kv, layer].reshape(n, L.num_kv_heads, L.head_dim).permute(1, 0, 2)[None] for kv in (0, 1))
            for layer in range(L.num_layers)]


class KvtcSerializer(Serializer):
    """One chunk ``[2, L, T, hidden]`` -> header + kvcal blob + CRC32, written into ``dst`` (a uint8 buffer)."""

    def __init__(self, codec: KVTCCodec, config: KvtcSerdeConfig):
        self.codec = codec
        self.config = config
        self.frame = key_frame(codec.artifact)
        limit = config.max_position
        if limit is None:
            model_config = getattr(codec.adapter, "config", None)
            limit = int(getattr(model_config, "max_position_embeddings", 0) or 0) or 131072
        self.candidates = torch.arange(0, max(limit, 1), config.chunk_size)

    def position(self, src, kv) -> tuple[int, str]:
        """The chunk's first position and where it came from."""
        if self.frame == POST_ROPE:
            return 0, "none"
        if self.config.positions == "zero":
            return 0, "zero"
        cached = getattr(getattr(src, "metadata", None), "cached_positions", None)
        if self.config.positions == "auto" and cached is not None and cached.numel() == kv[0][0].shape[2]:
            pos = cached.detach().to("cpu", torch.long).flatten()
            if bool((pos == pos[0] + torch.arange(pos.numel())).all()) and int(pos[0]) >= 0:
                return int(pos[0]), "metadata"
        keys = [kv[layer][0] for layer in self.codec.layout.coded_layers]
        return estimate_offset(self.codec, keys, self.candidates), "estimate"

    @torch.no_grad()
    def encode(self, t: torch.Tensor, src=None) -> bytes:
        """The serialised chunk for tensor ``t`` (``src`` is the MemoryObj, for its position metadata)."""
        kv = chunk_view(t, self.codec)
        n = t.shape[2]
        if n > self.config.chunk_size:
            raise ChunkLayoutError(f"chunk holds {n} tokens, more than the serde's chunk_size {self.config.chunk_size}; "
                                   "set the serde's chunk_size to LMCache's")
        offset, source = self.position(src, kv)
        blob = self.codec.compress(kv, position_offsets=[offset])
        head = _HEADER.pack(MAGIC, VERSION, FRAMES.index(self.frame), POSITION_SOURCES.index(source),
                            DTYPE_CODES.index(dtype_name(t.dtype)), t.shape[1], n, t.shape[3], len(blob))
        body = head + blob
        return body + _CRC.pack(zlib.crc32(body))

    def serialize(self, src, dst, key) -> int:
        t, out = src.tensor, dst.tensor
        if t is None or out is None:
            raise ChunkLayoutError("kvtc serde needs memory objects that hold tensors")
        data = self.encode(t, src)
        if out.dtype != torch.uint8 or out.numel() < len(data):
            raise KvcalError(f"kvtc serde: destination buffer holds {out.numel()} {out.dtype} elements, the chunk needs "
                             f"{len(data)} bytes")
        out.view(-1)[: len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return len(data)

    def estimate_serialized_size(self, layout_desc) -> int:
        """An upper bound: the chunk's own bytes in its dtype plus room for the headers.

        The coded chunk is typically ``ratio`` times smaller; LMCache narrows the buffer to the bytes written
        (``set_used_size``) before an L2 adapter stores it, so only a transient buffer is this large.
        """
        total = 0
        for shape, dtype in zip(layout_desc.shapes, layout_desc.dtypes):
            total += math.prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()
        return total + ESTIMATE_MARGIN


def parse_chunk(data: bytes | bytearray | memoryview) -> tuple[dict, memoryview]:
    """Header fields and the kvcal blob of a serialised chunk; any inconsistency is a one-line ``BitstreamError``."""
    view = memoryview(data)
    if len(view) < _HEADER.size + _CRC.size:
        raise BitstreamError(f"kvtc chunk is truncated ({len(view)} bytes)")
    magic, version, frame, source, dtype, layers, tokens, hidden, size = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise BitstreamError("not a kvtc chunk (bad magic): was it written by another serde?")
    if version != VERSION:
        raise BitstreamError(f"kvtc chunk format {version}; this kvcal reads format {VERSION}")
    end = _HEADER.size + size
    if end + _CRC.size > len(view):
        raise BitstreamError(f"kvtc chunk is truncated: its header announces {size} payload bytes, {len(view) - _HEADER.size - _CRC.size} are there")
    (crc,) = _CRC.unpack_from(view, end)
    if zlib.crc32(view[:end]) != crc:
        raise BitstreamError("kvtc chunk is corrupted (checksum mismatch)")
    if frame >= len(FRAMES) or source >= len(POSITION_SOURCES) or dtype >= len(DTYPE_CODES):
        raise BitstreamError("kvtc chunk header holds an unknown key frame, position source or dtype")
    header = {"frame": FRAMES[frame], "positions": POSITION_SOURCES[source], "dtype": DTYPE_CODES[dtype],
              "layers": layers, "tokens": tokens, "hidden": hidden, "payload": size}
    return header, view[_HEADER.size : end]


class KvtcDeserializer(Deserializer):
    """Serialised chunk -> ``dst`` ``[2, L, T, hidden]``, after every check has passed."""

    def __init__(self, codec: KVTCCodec, config: KvtcSerdeConfig):
        self.codec = codec
        self.config = config
        self.frame = key_frame(codec.artifact)

    @torch.no_grad()
    def decode(self, data, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The chunk tensor ``[2, L, T, hidden]`` in its stored dtype."""
        header, blob = parse_chunk(data)
        if header["frame"] != self.frame:
            raise BitstreamError(f"kvtc chunk was coded in the {header['frame']} key frame, this serde's artifact is "
                                 f"{self.frame}; configure the artifact it was made with")
        stored = (2, header["layers"], header["tokens"], header["hidden"])
        if shape is not None and tuple(shape) != stored:
            raise BitstreamError(f"kvtc chunk holds shape {list(stored)}, the destination is {list(shape)}")
        geo, sections = self.codec.parse(bytes(blob))
        if geo.batch != 1 or geo.seq_len != header["tokens"] or geo.dtype != header["dtype"]:
            raise BitstreamError("kvtc chunk header disagrees with its kvcal blob (forged or corrupted)")
        L = self.codec.layout
        if (header["layers"], header["hidden"]) != (L.num_layers, L.num_kv_heads * L.head_dim):
            raise BitstreamError("kvtc chunk header disagrees with the artifact's model layout")
        kv = self.codec.decode_tensors(geo, sections, torch.device("cpu"))
        n = header["tokens"]
        out = torch.empty(stored, dtype=DTYPES[header["dtype"]])
        for layer, (k, v) in enumerate(kv):
            out[0, layer] = k[0].permute(1, 0, 2).reshape(n, -1)
            out[1, layer] = v[0].permute(1, 0, 2).reshape(n, -1)
        return out

    def deserialize(self, src, dst, key) -> None:
        data, out = src.tensor, dst.tensor
        if data is None or out is None:
            raise ChunkLayoutError("kvtc serde needs memory objects that hold tensors")
        raw = data.contiguous().view(-1).view(torch.uint8).cpu().numpy()
        chunk = self.decode(memoryview(raw), tuple(out.shape))
        out.copy_(chunk.to(out.device, out.dtype))


def create_kvtc_serde(kwargs: dict) -> SerdeProcessor:
    """LMCache's factory for ``{"type": "kvtc", ...}``: settings checked, codec built once, async wrapper around it."""
    config = KvtcSerdeConfig.from_kwargs(dict(kwargs))
    codec = config.build_codec()
    return AsyncSerdeProcessor(KvtcSerializer(codec, config), KvtcDeserializer(codec, config),
                               max_workers=config.max_workers)


def register() -> None:
    """Register ``"kvtc"`` with LMCache's serde factory (once; importing this module does it)."""
    if SERDE_TYPE not in get_registered_serde_types():
        register_serde_factory(SERDE_TYPE, create_kvtc_serde)


register()


def main(argv: list[str] | None = None) -> None:
    """``python -m kvcal.integrations.lmcache server [args]`` is ``lmcache server [args]`` with ``kvtc`` registered
    first, so ``--l2-adapter`` specs can name it (LMCache's ``--server-module`` plugins load after the storage
    manager has built its adapters: too late to register a serde)."""
    import sys

    from lmcache.cli.main import main as lmcache_main

    sys.argv = ["lmcache", *(sys.argv[1:] if argv is None else argv)]
    lmcache_main()


if __name__ == "__main__":
    main()


__all__ = ["SERDE_TYPE", "ChunkLayoutError", "KvtcDeserializer", "KvtcSerdeConfig", "KvtcSerializer", "SerdeConfigError",
           "create_kvtc_serde", "estimate_offset", "parse_chunk", "register"]
