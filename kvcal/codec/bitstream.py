"""The versioned container that carries a compressed KV cache as bytes.

Layout (little-endian), in the spirit of safetensors — a small strict header is validated before a single
payload byte is trusted::

    MAGIC (8) | u16 format version | u32 header_len | header JSON (header_len) | payload | u32 CRC32

The header is canonical JSON (sorted keys, no whitespace) holding the codec's fields plus a ``sections`` table
that this module owns: ``[{name, offset, stored, raw, zstd}, ...]`` with offsets relative to the payload start.
Sections lie back to back and cover the payload exactly. The CRC32 covers every byte before it.

Every way a blob can be wrong — truncated, corrupted, foreign, from a newer kvcal, or crafted to exhaust memory —
ends in a one-line ``BitstreamError``; the reader bounds every allocation by sizes it has already checked.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zstandard

from kvcal.errors import BitstreamError, KvcalError

MAGIC = b"KVCALKV\x00"
FORMAT_VERSION = 2  # 2: codec v2 (calibrated steps, entropy-coded sections); 1: codec v1
MAX_SECTION_NAME_CHARS = 128

_PREFIX = struct.Struct("<8sHI")  # magic, format version, header_len
_CRC = struct.Struct("<I")
MIN_BLOB_BYTES = _PREFIX.size + _CRC.size
_MAX_U32 = 0xFFFFFFFF
_SECTION_KEYS = frozenset({"name", "offset", "stored", "raw", "zstd"})
_ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
# Each zstd block is at least 4 stored bytes (an RLE block) and at most 128 KiB decoded, so no frame can expand
# by more than this; a header claiming more is lying, and refusing it early stops tiny blobs forcing huge buffers.
_MAX_ZSTD_EXPANSION = (128 * 1024) // 4
_MIN_ZSTD_LEVEL = -(1 << 17)
_REPR_CHARS = 60


@dataclass(frozen=True)
class Limits:
    """Upper bounds the reader enforces before allocating anything; the defaults fit real caches."""

    max_header_bytes: int = 1 << 20
    max_sections: int = 4096
    max_section_raw_bytes: int = 1 << 34  # decompressed size bound per section
    max_total_raw_bytes: int = 1 << 36


@dataclass(frozen=True)
class _Section:
    name: str
    offset: int
    stored: int
    raw: int
    zstd: bool


@dataclass(frozen=True)
class _Layout:
    header: dict[str, Any]  # the caller's fields, without the "sections" table
    sections: list[_Section]
    payload: memoryview


# ---------------------------------------------------------------------------------------------------------------
# Header field validators the codec reuses, so each of its fields is checked with a one-liner.


def require_int(header: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    """``header[key]`` as an int in ``[lo, hi]``; JSON booleans do not count as integers."""
    value = _require_field(header, key)
    if not _is_int(value) or not lo <= value <= hi:
        raise BitstreamError(f"kvcal blob header field {key!r} must be an integer in [{lo}, {hi}], got {_short(value)}")
    return value


def require_str(header: Mapping[str, Any], key: str, choices: Collection[str] | None = None) -> str:
    """``header[key]`` as a string, one of ``choices`` when given."""
    value = _require_field(header, key)
    if not isinstance(value, str):
        raise BitstreamError(f"kvcal blob header field {key!r} must be a string, got {_short(value)}")
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(choice) for choice in sorted(choices))
        raise BitstreamError(f"kvcal blob header field {key!r} must be one of {allowed}, got {_short(value)}")
    return value


def require_list(
    header: Mapping[str, Any],
    key: str,
    min_len: int = 0,
    max_len: int = 1 << 20,
    item_type: type | None = None,
) -> list[Any]:
    """``header[key]`` as a list of ``min_len..max_len`` items, each an instance of ``item_type`` when given."""
    value = _require_field(header, key)
    if not isinstance(value, list):
        raise BitstreamError(f"kvcal blob header field {key!r} must be a list, got {_short(value)}")
    if not min_len <= len(value) <= max_len:
        raise BitstreamError(
            f"kvcal blob header field {key!r} must have {min_len} to {max_len} items, got {len(value)}"
        )
    if item_type is not None:
        for index, item in enumerate(value):
            if not _is_instance(item, item_type):
                raise BitstreamError(
                    f"kvcal blob header field {key!r} item {index} must be {item_type.__name__}, got {_short(item)}"
                )
    return value


def _require_field(header: Mapping[str, Any], key: str) -> Any:
    if not isinstance(header, Mapping):
        raise BitstreamError(f"kvcal blob header must be a JSON object to hold field {key!r}, got {_short(header)}")
    if key not in header:
        raise BitstreamError(f"kvcal blob header field {key!r} is missing")
    return header[key]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_instance(value: Any, expected: type) -> bool:
    if expected is int:
        return _is_int(value)
    if expected is float:  # JSON has one number type; a float field may legitimately hold a whole number
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    return isinstance(value, expected)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_CHARS else text[: _REPR_CHARS - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_blob(
    header: dict[str, Any],
    sections: Sequence[tuple[str, bytes]],
    zstd_level: int = 3,
    compress: bool | Sequence[bool] = True,
    compressed: dict[str, bytes] | None = None,
) -> bytes:
    """Pack ``header`` and named byte ``sections`` into one blob; the same inputs always give the same bytes.

    ``compress`` is one flag for all sections or one per section. ``compressed`` may hold, for sections that
    are to be compressed, their stored form already made by ``zstd_frame(data, zstd_level)`` (e.g. on another
    thread while the caller computed the rest); each is checked to declare its section's raw size. The writer
    refuses anything the reader with default ``Limits`` would refuse, so every blob it returns can be read back.
    """
    defaults = Limits()
    _check_writable_header(header)
    _check_zstd_level(zstd_level)
    sections = _named_sections(sections)
    flags = _compress_flags(compress, len(sections))
    if len(sections) > defaults.max_sections:
        raise BitstreamError(f"cannot write kvcal blob: {len(sections)} sections, the limit is {defaults.max_sections}")

    compressed = compressed or {}
    table: list[dict[str, Any]] = []
    stored_parts: list[bytes | memoryview] = []
    offset = 0
    seen: set[str] = set()
    for (name, data), use_zstd in zip(sections, flags, strict=True):
        _check_section_name(name, seen, context="cannot write kvcal blob")
        seen.add(name)
        raw = _byte_view(data, f"cannot write kvcal blob: section {name!r} data")
        if len(raw) > defaults.max_section_raw_bytes:
            raise BitstreamError(
                f"cannot write kvcal blob: section {name!r} has {len(raw)} bytes, "
                f"the limit is {defaults.max_section_raw_bytes}"
            )
        stored = raw
        if use_zstd:
            stored = compressed.get(name) or zstd_frame(raw, zstd_level)
            if zstandard.frame_content_size(stored) != len(raw):
                raise BitstreamError(f"cannot write kvcal blob: section {name!r}'s compressed form is not its data's")
        table.append({"name": name, "offset": offset, "stored": len(stored), "raw": len(raw), "zstd": use_zstd})
        stored_parts.append(stored)
        offset += len(stored)

    total_raw = sum(entry["raw"] for entry in table)
    if total_raw > defaults.max_total_raw_bytes:
        raise BitstreamError(
            f"cannot write kvcal blob: {total_raw} raw bytes in all, the limit is {defaults.max_total_raw_bytes}"
        )
    try:
        header_bytes = _canonical_json({**header, "sections": table})
    except (TypeError, ValueError, RecursionError) as err:
        raise BitstreamError(f"cannot write kvcal blob: header is not JSON-serialisable: {_first_line(err)}") from None
    if len(header_bytes) > min(defaults.max_header_bytes, _MAX_U32):
        raise BitstreamError(
            f"cannot write kvcal blob: header is {len(header_bytes)} bytes, the limit is {defaults.max_header_bytes}"
        )

    parts: list[bytes | memoryview] = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)), header_bytes]
    parts.extend(stored_parts)
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(_CRC.pack(crc))
    return b"".join(parts)


def zstd_frame(data: bytes | memoryview, level: int = 3) -> bytes:
    """A section's stored form when compressed: one zstd frame declaring its content size, no checksum (the blob's
    CRC covers it). Safe to call from several threads at once (zstandard releases the GIL while it works)."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False, threads=0).compress(data)


def _check_writable_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise BitstreamError(f"cannot write kvcal blob: header must be a dict, got {type(header).__name__}")
    if "sections" in header:
        raise BitstreamError("cannot write kvcal blob: header key 'sections' is reserved for the section table")


def _check_zstd_level(level: Any) -> None:
    if not _is_int(level) or not _MIN_ZSTD_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise BitstreamError(
            f"cannot write kvcal blob: zstd level must be an integer in "
            f"[{_MIN_ZSTD_LEVEL}, {zstandard.MAX_COMPRESSION_LEVEL}], got {_short(level)}"
        )


def _named_sections(sections: Any) -> list[tuple[Any, Any]]:
    try:
        pairs = [tuple(pair) for pair in sections]
    except TypeError:
        raise BitstreamError("cannot write kvcal blob: sections must be a list of (name, bytes) pairs") from None
    if any(len(pair) != 2 for pair in pairs):
        raise BitstreamError("cannot write kvcal blob: sections must be a list of (name, bytes) pairs")
    return pairs


def _compress_flags(compress: bool | Sequence[bool], count: int) -> list[bool]:
    if isinstance(compress, bool):
        return [compress] * count
    flags = list(compress)
    if len(flags) != count or not all(isinstance(flag, bool) for flag in flags):
        raise BitstreamError(f"cannot write kvcal blob: compress must be a bool or {count} bools, got {_short(flags)}")
    return flags


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _byte_view(data: Any, what: str) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer, without copying it."""
    if isinstance(data, str):  # str has no buffer interface, but say so plainly rather than via TypeError text
        raise BitstreamError(f"{what} must be bytes-like, got str")
    try:
        return memoryview(data).cast("B")
    except (TypeError, ValueError) as err:
        raise BitstreamError(
            f"{what} must be a contiguous bytes-like object, got {type(data).__name__}: {err}"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_blob(
    blob: bytes | bytearray | memoryview,
    limits: Limits = Limits(),
    expect_raw_bytes: Callable[[dict[str, Any]], Mapping[str, int | tuple[int, int]]] | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Validate and unpack a blob into ``(header, {section name: raw bytes})``.

    ``header`` is the writer's header (the section table is removed). ``expect_raw_bytes``, when given, maps the
    header to the raw size each section must have (or inclusive ``(lo, hi)`` bounds) — the codec derives it from
    shapes it has validated — and is
    checked before anything is decompressed, so a blob cannot make the reader allocate more than its shapes imply.
    """
    header, sections = read_blob_lazily(blob, limits, expect_raw_bytes)
    return header, {name: sections[name] for name in sections}


def read_blob_lazily(
    blob: bytes | bytearray | memoryview,
    limits: Limits = Limits(),
    expect_raw_bytes: Callable[[dict[str, Any]], Mapping[str, int | tuple[int, int]]] | None = None,
) -> tuple[dict[str, Any], LazySections]:
    """``read_blob``, except that each section is decoded (a zstd one decompressed) when first looked up, so that a
    caller can start work on some sections before it pays for the others. Every check ``read_blob`` makes before
    decompressing (magic, version, CRC, header, section table, expected sizes) is made before this returns; a
    section's own decoding errors are raised at its lookup."""
    layout = _parse_layout(blob, limits)
    if expect_raw_bytes is not None:
        _check_expected_raw_bytes(layout, expect_raw_bytes)
    return layout.header, LazySections(layout)


class LazySections(Mapping[str, bytes]):
    """A validated blob's sections by name, in blob order, each decoded once, on first lookup."""

    def __init__(self, layout: _Layout) -> None:
        self._layout = layout
        self._by_name = {section.name: section for section in layout.sections}
        self._decoded: dict[str, bytes] = {}
        self._decompressor = zstandard.ZstdDecompressor()

    def __getitem__(self, name: str) -> bytes:
        if name not in self._decoded:
            section = self._by_name[name]
            stored = self._layout.payload[section.offset : section.offset + section.stored]
            self._decoded[name] = _decode_section(stored, section, self._decompressor)
        return self._decoded[name]

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


def section_sizes(blob: bytes | bytearray | memoryview, limits: Limits = Limits()) -> dict[str, dict[str, Any]]:
    """Per section, in blob order: ``{"stored": bytes in the blob, "raw": decoded bytes, "compressed": bool}``."""
    layout = _parse_layout(blob, limits)
    return {
        section.name: {"stored": section.stored, "raw": section.raw, "compressed": section.zstd}
        for section in layout.sections
    }


def _parse_layout(blob: Any, limits: Limits) -> _Layout:
    view = _byte_view(blob, "kvcal blob")
    size = len(view)
    if not MAGIC.startswith(bytes(view[: len(MAGIC)])):
        raise BitstreamError("not a kvcal blob: the magic bytes are wrong")
    if size < MIN_BLOB_BYTES:
        raise BitstreamError(f"kvcal blob is truncated: {size} bytes, a blob is at least {MIN_BLOB_BYTES}")
    _, version, header_len = _PREFIX.unpack_from(view)
    _check_version(version)

    (stored_crc,) = _CRC.unpack_from(view, size - _CRC.size)
    if zlib.crc32(view[: size - _CRC.size]) != stored_crc:
        raise _checksum_failure(view, header_len, limits)

    if header_len > limits.max_header_bytes:
        raise BitstreamError(f"kvcal blob header is {header_len} bytes, over the limit of {limits.max_header_bytes}")
    header_end = _PREFIX.size + header_len
    payload_end = size - _CRC.size
    if header_end > payload_end:
        raise BitstreamError(f"kvcal blob header length {header_len} runs past the end of the {size}-byte blob")
    header = _parse_header_json(bytes(view[_PREFIX.size : header_end]))
    sections = _parse_section_table(header.pop("sections", None), limits)
    payload = view[header_end:payload_end]
    covered = _payload_extent(sections)
    if covered != len(payload):
        raise BitstreamError(
            f"kvcal blob section table covers {covered} payload bytes but the payload has {len(payload)}"
        )
    return _Layout(header=header, sections=sections, payload=payload)


def _check_version(version: int) -> None:
    if version > FORMAT_VERSION:
        raise BitstreamError(
            f"kvcal blob has format version {version}, but this kvcal reads only version {FORMAT_VERSION}: "
            "upgrade kvcal to read it"
        )
    if version == 1:
        raise BitstreamError(
            "kvcal blob has format version 1 (codec v1, per-token scales); this kvcal decodes version 2 only: "
            "decode it with kvcal 0.1 and compress the cache again"
        )
    if version < 1:
        raise BitstreamError(f"kvcal blob has unknown format version {version}")


def _checksum_failure(view: memoryview, header_len: int, limits: Limits) -> BitstreamError:
    """Name the likely cause of a CRC mismatch; the untrusted header is only read to word the message."""
    size = len(view)
    header_end = _PREFIX.size + header_len
    if header_len <= limits.max_header_bytes:
        if header_end + _CRC.size > size:
            return BitstreamError(
                f"kvcal blob is truncated: {size} bytes, header says at least {header_end + _CRC.size}"
            )
        try:
            header = _parse_header_json(bytes(view[_PREFIX.size : header_end]))
            declared = header_end + _payload_extent(_parse_section_table(header.get("sections"), limits)) + _CRC.size
        except BitstreamError:
            declared = size
        if declared > size:
            return BitstreamError(f"kvcal blob is truncated: {size} bytes, header says {declared}")
        if declared < size:
            return BitstreamError(f"kvcal blob has {size - declared} unexpected bytes after its end ({declared} bytes)")
    return BitstreamError("kvcal blob checksum mismatch: the data is corrupted")


def _parse_header_json(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BitstreamError("kvcal blob header is not valid UTF-8") from None
    try:
        header = json.loads(
            text,
            object_pairs_hook=_object_without_duplicate_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise BitstreamError("kvcal blob header JSON is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, and int() refusing thousands of digits
        raise BitstreamError(f"kvcal blob header is not valid JSON: {_first_line(err)}") from None
    if not isinstance(header, dict):
        raise BitstreamError(f"kvcal blob header must be a JSON object, got {type(header).__name__}")
    # One byte string per header keeps blobs deterministic and leaves no room for parser disagreements.
    try:
        canonical = _canonical_json(header)
    except RecursionError:  # the encoder's depth budget can run out just before the decoder's did
        raise BitstreamError("kvcal blob header JSON is nested too deeply") from None
    if canonical != raw:
        raise BitstreamError("kvcal blob header is not canonical JSON (sorted keys, no whitespace)")
    return header


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BitstreamError(f"kvcal blob header repeats the key {_short(key)}")
            seen.add(key)
    return obj


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf, which no canonical writer could have produced
        raise BitstreamError(f"kvcal blob header holds the out-of-range number {_short(text)}")
    return value


def _reject_constant(name: str) -> Any:
    raise BitstreamError(f"kvcal blob header holds the non-finite number {name}")


def _first_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return lines[0] if lines else type(err).__name__


def _parse_section_table(table: Any, limits: Limits) -> list[_Section]:
    if table is None:
        raise BitstreamError("kvcal blob header has no 'sections' table")
    if not isinstance(table, list):
        raise BitstreamError(f"kvcal blob header 'sections' must be a list, got {type(table).__name__}")
    if len(table) > limits.max_sections:
        raise BitstreamError(f"kvcal blob has {len(table)} sections, over the limit of {limits.max_sections}")
    sections: list[_Section] = []
    seen: set[str] = set()
    next_offset = 0
    total_raw = 0
    for index, entry in enumerate(table):
        section = _parse_section_entry(index, entry, seen)
        seen.add(section.name)
        if section.offset != next_offset:
            raise BitstreamError(
                f"kvcal blob section {section.name!r} starts at payload offset {section.offset}, expected "
                f"{next_offset}: sections must lie back to back"
            )
        _check_section_sizes(section, limits)
        total_raw += section.raw
        if total_raw > limits.max_total_raw_bytes:
            raise BitstreamError(
                f"kvcal blob sections hold over {limits.max_total_raw_bytes} raw bytes in all, over the limit"
            )
        next_offset += section.stored
        sections.append(section)
    return sections


def _parse_section_entry(index: int, entry: Any, seen: set[str]) -> _Section:
    if not isinstance(entry, dict):
        raise BitstreamError(f"kvcal blob section entry {index} must be a JSON object, got {type(entry).__name__}")
    if set(entry) != _SECTION_KEYS:
        raise BitstreamError(
            f"kvcal blob section entry {index} has keys {sorted(entry)}, expected {sorted(_SECTION_KEYS)}"
        )
    name = entry["name"]
    _check_section_name(name, seen, context="kvcal blob")
    sizes = {}
    for key in ("offset", "stored", "raw"):
        value = entry[key]
        if not _is_int(value) or value < 0:
            raise BitstreamError(
                f"kvcal blob section {name!r} {key} must be a non-negative integer, got {_short(value)}"
            )
        sizes[key] = value
    if not isinstance(entry["zstd"], bool):
        raise BitstreamError(
            f"kvcal blob section {name!r} zstd flag must be true or false, got {_short(entry['zstd'])}"
        )
    return _Section(name=name, offset=sizes["offset"], stored=sizes["stored"], raw=sizes["raw"], zstd=entry["zstd"])


def _check_section_name(name: Any, seen: set[str], context: str) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SECTION_NAME_CHARS:
        raise BitstreamError(
            f"{context}: section name must be a non-empty string of at most {MAX_SECTION_NAME_CHARS} characters, "
            f"got {_short(name)}"
        )
    if name in seen:
        raise BitstreamError(f"{context}: section name {name!r} appears twice")


def _check_section_sizes(section: _Section, limits: Limits) -> None:
    if section.raw > limits.max_section_raw_bytes:
        raise BitstreamError(
            f"kvcal blob section {section.name!r} declares {section.raw} raw bytes, "
            f"over the limit of {limits.max_section_raw_bytes}"
        )
    if not section.zstd and section.stored != section.raw:
        raise BitstreamError(
            f"kvcal blob section {section.name!r} is uncompressed but stores {section.stored} bytes for "
            f"{section.raw} raw bytes"
        )
    if section.zstd and section.raw > section.stored * _MAX_ZSTD_EXPANSION:
        raise BitstreamError(
            f"kvcal blob section {section.name!r} declares {section.raw} raw bytes from {section.stored} stored "
            "bytes, more than zstd can expand"
        )


def _payload_extent(sections: list[_Section]) -> int:
    return sections[-1].offset + sections[-1].stored if sections else 0


def _check_expected_raw_bytes(layout: _Layout, expect_raw_bytes: Callable[[dict[str, Any]], Mapping[str, int]]) -> None:
    try:
        expected = expect_raw_bytes(layout.header)
    except KvcalError:
        raise
    except Exception as err:  # a codec validator tripping over a hostile header must still end as a BitstreamError
        raise BitstreamError(
            f"kvcal blob header was rejected by the codec: {type(err).__name__}: {_first_line(err)}"
        ) from err
    if not isinstance(expected, Mapping):
        raise BitstreamError(
            f"kvcal codec gave {type(expected).__name__} for the expected section sizes, not a mapping"
        )
    declared = {section.name: section.raw for section in layout.sections}
    missing = sorted(set(expected) - set(declared))
    unexpected = sorted(set(declared) - set(expected))
    if missing or unexpected:
        raise BitstreamError(
            f"kvcal blob sections do not match its header: missing {_short(missing)}, unexpected {_short(unexpected)}"
        )
    for name, raw in declared.items():
        want = expected[name]
        # An exact size, or (for entropy-coded sections, whose size depends on the data) inclusive bounds.
        lo, hi = want if isinstance(want, tuple) else (want, want)
        if not (_is_int(lo) and _is_int(hi) and lo <= raw <= hi):
            raise BitstreamError(
                f"kvcal blob section {name!r} declares {raw} raw bytes, but its header implies {_short(want)}"
            )


def _decode_section(stored: memoryview, section: _Section, decompressor: zstandard.ZstdDecompressor) -> bytes:
    if not section.zstd:
        return bytes(stored)
    if bytes(stored[: len(_ZSTD_FRAME_MAGIC)]) != _ZSTD_FRAME_MAGIC:
        raise BitstreamError(f"kvcal blob section {section.name!r} is marked zstd but is not a zstd frame")
    try:
        frame = zstandard.get_frame_parameters(stored)
    except zstandard.ZstdError as err:
        raise BitstreamError(
            f"kvcal blob section {section.name!r} has a bad zstd frame header: {_first_line(err)}"
        ) from None
    # zstandard sizes its output buffer from the frame's own content size and ignores max_output_size when one is
    # present, so the frame must declare exactly the raw size already checked against the limits.
    if frame.content_size != section.raw:
        declared = "no size" if frame.content_size == zstandard.CONTENTSIZE_UNKNOWN else f"{frame.content_size} bytes"
        raise BitstreamError(
            f"kvcal blob section {section.name!r} zstd frame declares {declared}, but the header says {section.raw}"
        )
    try:
        raw = decompressor.decompress(stored, max_output_size=section.raw, allow_extra_data=False)
    except zstandard.ZstdError as err:
        raise BitstreamError(f"kvcal blob section {section.name!r} does not decompress: {_first_line(err)}") from None
    except MemoryError:
        raise BitstreamError(f"kvcal blob section {section.name!r} needs {section.raw} bytes: out of memory") from None
    if len(raw) != section.raw:
        raise BitstreamError(
            f"kvcal blob section {section.name!r} decompressed to {len(raw)} bytes, the header says {section.raw}"
        )
    return raw
