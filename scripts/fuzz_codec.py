"""Fuzz ``KVTCCodec.decompress`` with mutated blobs of real caches; results on file.

    python scripts/fuzz_codec.py                      # 100000 blobs, seed 0, 2 workers -> results/fuzz.{json,md}
    python scripts/fuzz_codec.py --blobs 2000 --out results/tmp/fuzz
    python scripts/fuzz_codec.py --replay 1234        # re-run one blob in-process, with its traceback

Tiny random models (``tests/fixtures.py``) are calibrated exactly as the tests do (``TINY_CAL``), into a temporary
directory unless ``--model-dir`` names calibrated ones. Real caches of several lengths (1 token up, around
sink + window, batches of 1 and 2, left padding, position offsets, fp32/fp16/bf16) are compressed with each
entropy stage, and blob ``i`` is mutation ``i`` of a seeded generator (``make_case(i, seed, bases)``: the same
seed and bases always give the same bytes, so any failure replays from its index alone).

Every blob must end one of two ways: refused with a one-line ``BitstreamError``/``KvcalError``, or decoded to a
cache whose tensors are finite and shaped as its header says. Anything else is a failure: another exception, a
multi-line message, non-finite or misshapen tensors, a foreign blob accepted, a hang (a blob over
``--timeout`` seconds: its worker is killed), a blow-up (``MemoryError`` under the ``--mem-gib`` address-space
cap) or a crashed worker. The exit status is 1 when any failure occurs.

On the way, determinism: each cache compressed twice gives identical bytes, and a fresh subprocess with another
``torch.set_num_threads`` compresses the same tensors to the same bytes (and decodes them to the same tensors).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import re
import resource
import shlex
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREFIX = struct.Struct("<8sHI")  # magic, format version, header_len (kvcal.codec.bitstream._PREFIX)
CRC = struct.Struct("<I")
MAGIC = b"KVCALKV\x00"

OK_OUTCOMES = ("refused", "decoded")
FAIL_OUTCOMES = ("other_exception", "multiline_error", "nonfinite", "bad_shape", "accepted_foreign", "hang",
                 "blowup", "crash")

# ---------------------------------------------------------------------------------------------------------------
# Blob anatomy: split a blob into its parts and put one back together with a valid CRC.


def canonical(obj: Any) -> bytes:
    """The header JSON as the writer makes it (``allow_nan`` so a forged NaN reaches the reader as text)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def sign(body: bytes | bytearray) -> bytes:
    """``body`` plus the CRC32 of every byte of it: what ``write_blob`` appends."""
    return bytes(body) + CRC.pack(zlib.crc32(body))


def resign(blob: bytes | bytearray) -> bytes:
    """Replace a blob's last 4 bytes with the CRC of everything before them."""
    return sign(blob[:-4]) if len(blob) >= 4 else bytes(blob)


def assemble(header: Any, payload: bytes, version: int = 2, header_bytes: bytes | None = None,
             header_len: int | None = None) -> bytes:
    header_bytes = canonical(header) if header_bytes is None else header_bytes
    declared = len(header_bytes) if header_len is None else header_len
    return sign(PREFIX.pack(MAGIC, version, declared) + header_bytes + payload)


@dataclass
class Base:
    """One real blob and what mutators need to know about it."""

    name: str  # e.g. "llama/rans@4/n37b1"
    codec: str  # key of the codec that made it (and reads it)
    blob: bytes
    header: dict  # with the "sections" table
    header_bytes: bytes
    payload: bytes
    sections: dict[str, bytes]  # decoded raw bytes
    flags: list[bool]  # zstd per section, in order

    @classmethod
    def from_blob(cls, name: str, codec: str, blob: bytes) -> Base:
        from kvcal.codec.bitstream import read_blob

        _, _, header_len = PREFIX.unpack_from(blob)
        header_bytes = blob[PREFIX.size : PREFIX.size + header_len]
        header = json.loads(header_bytes)
        _, sections = read_blob(blob)
        return cls(name, codec, blob, header, header_bytes, blob[PREFIX.size + header_len : -4], sections,
                   [entry["zstd"] for entry in header["sections"]])

    @property
    def fields(self) -> dict:
        return {k: v for k, v in self.header.items() if k != "sections"}

    def rewrite(self, fields: dict, sections: dict[str, bytes] | None = None, flags: list[bool] | None = None) -> bytes:
        """A valid container (CRC and section table right) around ``fields`` and (possibly edited) sections."""
        from kvcal.codec.bitstream import write_blob

        if sections is None:  # keep the payload bytes as they are: no recompression
            return assemble({**fields, "sections": self.header["sections"]}, self.payload)
        return write_blob(fields, list(sections.items()), compress=flags if flags is not None else self.flags)


# ---------------------------------------------------------------------------------------------------------------
# Mutators: (rng, base, bases) -> (bytes, short description). Byte-level ones re-sign the CRC half the time.

SPECIAL_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)
FLOAT_PATTERNS = {  # little-endian float32 bit patterns worth writing into exact tokens
    "nan": struct.pack("<f", math.nan), "inf": struct.pack("<f", math.inf), "-inf": struct.pack("<f", -math.inf),
    "max": struct.pack("<f", 3.4028235e38), "tiny": struct.pack("<I", 1), "-0": struct.pack("<f", -0.0),
    "big": struct.pack("<f", 1e30),
}


def bit_flip(rng, base, bases):
    data = bytearray(base.blob)
    bits = [rng.randrange(len(data) * 8) for _ in range(rng.choice((1, 1, 1, 2, 3, 8)))]
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    return data, f"flip bits {bits[:4]}"


def byte_overwrite(rng, base, bases):
    data = bytearray(base.blob)
    if rng.random() < 0.5:
        spots = [rng.randrange(len(data)) for _ in range(rng.randint(1, 8))]
        for i in spots:
            data[i] = rng.choice(SPECIAL_BYTES) if rng.random() < 0.4 else rng.randrange(256)
        return data, f"overwrite bytes at {spots[:4]}"
    start, length = rng.randrange(len(data)), rng.randint(1, 32)
    fill = bytes([rng.choice(SPECIAL_BYTES)]) * length if rng.random() < 0.5 else rng.randbytes(length)
    data[start : start + length] = fill[: len(data) - start]
    return data, f"overwrite run {start}+{length}"


def truncate(rng, base, bases):
    n = len(base.blob)
    cut = rng.choice((rng.randrange(n), n - rng.randint(1, 16), rng.randrange(64), PREFIX.size + rng.randrange(8)))
    cut = max(0, min(cut, n - 1))
    if rng.random() < 0.3:  # remove a range from the middle instead
        start = rng.randrange(n)
        length = rng.randint(1, 64)
        return base.blob[:start] + base.blob[start + length :], f"delete {start}+{length}"
    return base.blob[:cut], f"truncate to {cut}"


def extend(rng, base, bases):
    junk = rng.choice((bytes(rng.randint(1, 8)), rng.randbytes(rng.randint(1, 64)), base.blob[-4:],
                       base.blob[: rng.randint(1, 32)]))
    if rng.random() < 0.5:
        return base.blob + junk, f"append {len(junk)}"
    at = rng.randrange(len(base.blob) + 1)
    return base.blob[:at] + junk + base.blob[at:], f"insert {len(junk)} at {at}"


def splice(rng, base, bases):
    source = base.blob if rng.random() < 0.6 else rng.choice(bases).blob
    length = rng.randint(1, 256)
    src = rng.randrange(len(source))
    chunk = source[src : src + length]
    dst = rng.randrange(len(base.blob))
    data = bytearray(base.blob)
    data[dst : dst + len(chunk)] = chunk  # overwrite, same length where it fits
    return data, f"splice {len(chunk)} bytes from {src} to {dst}"


def duplicate(rng, base, bases):
    n = len(base.blob)
    start = rng.randrange(n)
    length = rng.randint(1, min(512, n))
    chunk = base.blob[start : start + length]
    at = rng.choice((start, start + len(chunk), rng.randrange(n + 1)))
    return base.blob[:at] + chunk + base.blob[at:], f"duplicate {start}+{len(chunk)} at {at}"


def random_bytes(rng, base, bases):
    n = rng.choice((0, 1, 3, 13, 17, 64, rng.randrange(4 * len(base.blob) + 1)))
    body = rng.randbytes(n)
    style = rng.randrange(4)
    if style == 0:
        return body, f"{n} random bytes"
    if style == 1:
        return MAGIC + body, f"magic + {n} random bytes"
    if style == 2:
        return sign(PREFIX.pack(MAGIC, 2, rng.randrange(n + 1)) + body), f"prefix + {n} random bytes, signed"
    return assemble(base.header, body), f"real header + {n} random payload bytes, signed"


def prefix_edit(rng, base, bases):
    _, version, header_len = PREFIX.unpack_from(base.blob)
    rest = base.blob[PREFIX.size : -4]
    what = rng.randrange(3)
    magic = MAGIC
    if what == 0:
        version = rng.choice((0, 1, 3, 0xFFFF, 2 + rng.randint(1, 100)))
    elif what == 1:
        header_len = rng.choice((0, 1, header_len - 1, header_len + 1, header_len + rng.randint(2, 64),
                                 rng.randrange(header_len + 1), 0xFFFFFFFF, 1 << 20, (1 << 20) + 1))
        header_len = max(0, min(header_len, 0xFFFFFFFF))
    else:
        magic = bytearray(MAGIC)
        magic[rng.randrange(8)] ^= 1 << rng.randrange(8)
        magic = bytes(magic)
    return sign(PREFIX.pack(magic, version, header_len) + rest), f"prefix v{version} len {header_len} magic {magic!r}"


def _int_values(rng: random.Random, v: int) -> list:
    return [v + 1, v - 1, 0, -1, 1, v * 2, v + rng.randint(2, 40), 2**31, 2**40, 2**63, 10**30, True, False, None,
            str(v), float(v), v + 0.5, [], {}, [v]]


def _list_values(rng: random.Random, v: list) -> list:
    out: list = [[], v + v[:1], v[:-1], 0, None, "x", [None] * len(v), [True] * len(v), [-1] * len(v),
                 [2**40] * len(v), [float(x) if isinstance(x, int) else x for x in v]]
    if v and all(isinstance(x, int) for x in v):
        out += [[1] * len(v), [2] * len(v), [max(0, x // rng.choice((2, 8, 64))) for x in v]]
    if v:
        i = rng.randrange(len(v))
        for delta in (1, -1, rng.randint(2, 200), rng.randint(2, 600) * rng.choice((1, -1))):
            w = list(v)
            w[i] = w[i] + delta if isinstance(w[i], int) else delta
            out.append(w)
    return out


def _str_values(rng: random.Random, v: str, choices: tuple[str, ...]) -> list:
    return [*choices, "", v.upper(), v + "x", v[:-1], "\u043b\u0430\u043c\u0430", "x" * 1000, 4, None, [v], True]


STR_CHOICES = {
    "kind": ("kvcal-kvtc", "kvcal-kvtc-v1", "kvcal"), "entropy": ("rans", "ans", "zstd", "range", "none"),
    "dtype": ("float32", "float16", "bfloat16", "float64", "int8"), "ratio": ("2", "4", "8", "4.0", "3", "0", "-4"),
    "model_type": ("llama", "gemma2", "mistral", "qwen3", "deepseek_v3"),
}


def header_field(rng, base, bases):
    """One or two codec header fields changed (or dropped, or an unknown one added); CRC and table right."""
    fields = base.fields
    style = rng.randrange(10)
    if style == 0:
        key = rng.choice(sorted(fields))
        fields.pop(key)
        return base.rewrite(fields), f"drop field {key!r}"
    if style == 1:
        key = rng.choice(("extra", "version", "sections2", "Kind", "sink ", "", "format"))
        fields[key] = rng.choice((1, "x", None, [], {"a": 1}))
        return base.rewrite(fields), f"unknown field {key!r}"
    if style == 2:  # a consistent new geometry: sizes no longer match the sections
        n = rng.choice((fields["seq_len"] + rng.choice((-1, 1, -5, 5, 40)), 1, 1 << 10, 1 << 14, 1 << 17, 1 << 20))
        n = max(1, min(n, 1 << 20))
        fields["seq_len"] = n
        fields["layer_lens"] = [n if (x == base.fields["seq_len"]) else min(x, n) for x in fields["layer_lens"]]
        fields["pads"] = [min(p, n - 1) for p in fields["pads"]]
        return base.rewrite(fields), f"consistent seq_len {n}"
    if style == 3:
        b = max(1, rng.choice((fields["batch"] - 1, fields["batch"] + 1, 2, 1 << 8, 1 << 16, 1 << 20)))
        fields["batch"] = b
        fields["pads"] = (fields["pads"] * b)[:b]
        fields["offsets"] = (fields["offsets"] * b)[:b]
        return base.rewrite(fields), f"consistent batch {b}"
    if style == 4:  # another real header, this payload
        other = rng.choice(bases)
        return base.rewrite(other.fields), f"header of {other.name}"
    if style == 5:  # sink/window moved while the payload keeps its sizes, or swapped
        s, w = fields["sink"], fields["window"]
        fields["sink"], fields["window"] = rng.choice(((s + 1, w - 1), (s - 1, w + 1), (w, s), (0, 0), (s, w + 4),
                                                       (fields["seq_len"] + 1, w), (6, w)))
        return base.rewrite(fields), f"sink {fields['sink']} window {fields['window']}"
    keys = rng.sample(sorted(fields), rng.choice((1, 1, 1, 2)))
    for key in keys:
        v = fields[key]
        if isinstance(v, bool) or v is None:
            values = [not v, 0, 1, None]
        elif isinstance(v, int):
            values = _int_values(rng, v)
        elif isinstance(v, list):
            values = _list_values(rng, v)
        elif isinstance(v, str):
            values = _str_values(rng, v, STR_CHOICES.get(key, ()))
        else:
            values = [None, 0, "x"]
        fields[key] = rng.choice(values)
    return base.rewrite(fields), "set " + ", ".join(f"{k}={_short(fields[k], 24)}" for k in keys)


def section_table(rng, base, bases):
    """Edits of the container's own ``sections`` table, with the payload fixed up to match half the time."""
    header = json.loads(base.header_bytes)
    table = header["sections"]
    payload = bytearray(base.payload)
    i = rng.randrange(len(table))
    entry = table[i]
    style = rng.randrange(9)
    if style == 0:
        key = rng.choice(("stored", "raw", "offset"))
        entry[key] = rng.choice((entry[key] + 1, entry[key] - 1, 0, entry[key] * 2, 2**33, 2**63, -1,
                                 entry[key] + rng.randint(2, 400), None, "1", 1.0))
        desc = f"section {entry['name']} {key}={_short(entry[key], 20)}"
    elif style == 1:
        entry["zstd"] = rng.choice((not entry["zstd"], 0, 1, None))
        desc = f"section {entry['name']} zstd={entry['zstd']}"
    elif style == 2:
        entry["name"] = rng.choice(["exact", "k0", "v0", "k1", "v1", "k9", "", "x" * 200, 0,
                                    *(e["name"] for e in table)])
        desc = f"section {i} renamed {_short(entry['name'], 20)}"
    elif style == 3:
        dropped = table.pop(i)
        desc = f"drop section {dropped['name']}"
    elif style == 4:
        table.insert(i, dict(entry))
        desc = f"duplicate section {entry['name']}"
    elif style == 5 and len(table) > 1:
        j = rng.randrange(len(table))
        table[i], table[j] = table[j], table[i]
        desc = f"swap sections {i},{j}"
    elif style == 6:
        entry[rng.choice(("extra", "crc", "Name"))] = 1
        desc = f"section {entry['name']} extra key"
    elif style == 7:
        table.append({"name": "extra", "offset": 0, "stored": rng.randint(0, 64), "raw": rng.randint(0, 64),
                      "zstd": rng.random() < 0.5})
        desc = "extra section"
    else:
        header["sections"] = rng.choice(([], None, {}, [[]], "x", table * 2))
        table = header["sections"] if isinstance(header["sections"], list) else []
        desc = f"table -> {_short(header['sections'], 24)}"
    if rng.random() < 0.5 and all(isinstance(e, dict) for e in table):
        # Lay the sections back to back again and make the payload as long as they claim.
        offset = 0
        for e in table:
            if isinstance(e.get("stored"), int) and not isinstance(e.get("stored"), bool) and 0 <= e["stored"] < 1 << 24:
                e["offset"] = offset
                offset += e["stored"]
        if offset < 1 << 24:
            payload = payload[:offset] + bytes(max(0, offset - len(payload)))
        desc += ", fixed up"
    return assemble(header, bytes(payload)), desc


def header_text(rng, base, bases):
    """Edits of the header's JSON text itself (digits, characters, whitespace), header_len kept consistent."""
    text = bytearray(base.header_bytes)
    style = rng.randrange(6)
    if style in (0, 1):  # change a digit: still canonical JSON, usually a new value the validators must catch
        digits = [i for i, c in enumerate(text) if 48 <= c <= 57]
        i = rng.choice(digits)
        text[i] = rng.choice(b"0123456789")
        desc = f"digit at {i} -> {chr(text[i])}"
    elif style == 2:
        i = rng.randrange(len(text))
        text[i] = rng.randrange(32, 127)
        desc = f"char at {i} -> {chr(text[i])!r}"
    elif style == 3:
        i = rng.randrange(len(text) + 1)
        text[i:i] = rng.choice((b" ", b"\n", b"0", b"-", b"1e400", b"NaN", b'"', b"\xff", b"[", b"{", b","))
        desc = f"insert at {i}"
    elif style == 4:
        i = rng.randrange(len(text))
        del text[i : i + rng.randint(1, 8)]
        desc = f"delete at {i}"
    else:
        depth = rng.choice((10, 1000, 100000))
        text = bytearray(b'{"a":' + b"[" * depth + b"]" * depth + b"," + bytes(base.header_bytes[1:]))
        desc = f"nested {depth}"
    return assemble(None, base.payload, header_bytes=bytes(text)), desc


def payload_crc(rng, base, bases):
    """Byte edits inside the payload only, CRC recomputed."""
    start = PREFIX.size + len(base.header_bytes)
    end = len(base.blob) - 4
    data = bytearray(base.blob)
    if end <= start:
        return resign(data), "empty payload"
    count = rng.choice((1, 1, 2, 4, 16))
    spots = []
    for _ in range(count):
        i = rng.randrange(start, end)
        spots.append(i - start)
        if rng.random() < 0.5:
            data[i] ^= 1 << rng.randrange(8)
        else:
            data[i] = rng.randrange(256)
    return resign(data), f"payload bytes {spots[:4]}"


def section_edit(rng, base, bases):
    """Edits of one decoded section's raw bytes, re-packed by the real writer (valid zstd frames, table, CRC)."""
    sections = dict(base.sections)
    name = rng.choice(list(sections))
    raw = bytearray(sections[name])
    style = rng.randrange(8)
    if style == 0 and raw:
        spots = [rng.randrange(len(raw)) for _ in range(rng.choice((1, 2, 8)))]
        for i in spots:
            raw[i] ^= 1 << rng.randrange(8)
        desc = f"flip {name} bytes {spots[:3]}"
    elif style == 1 and len(raw) >= 4:
        pattern = rng.choice(sorted(FLOAT_PATTERNS))
        i = rng.randrange(len(raw) // 4) * 4
        raw[i : i + 4] = FLOAT_PATTERNS[pattern]
        desc = f"{name} word {i // 4} = {pattern}"
    elif style == 2:
        cut = rng.choice((1, 2, 3, 4, 8, len(raw)))
        raw = raw[: max(0, len(raw) - cut)]
        desc = f"{name} shortened by {cut}"
    elif style == 3:
        more = rng.choice((1, 2, 4, 8, 64))
        raw += rng.randbytes(more) if rng.random() < 0.5 else bytes(more)
        desc = f"{name} lengthened by {more}"
    elif style == 4:
        raw = bytearray(bytes([rng.choice(SPECIAL_BYTES)]) * len(raw))
        desc = f"{name} all {raw[:1].hex() or 'empty'}"
    elif style == 5:
        raw = bytearray(rng.randbytes(len(raw)))
        desc = f"{name} random"
    elif style == 6 and len(sections) > 1:
        other = rng.choice([n for n in sections if n != name])
        sections[other], raw = bytes(raw), bytearray(sections[other])
        desc = f"swap {name} and {other}"
    else:
        words = len(raw) // 2
        if words:
            i = rng.randrange(words) * 2
            raw[i : i + 2] = struct.pack("<h", rng.choice((32767, -32768, -1, 1000)))
        desc = f"{name} int16 extreme"
    sections[name] = bytes(raw)
    flags = list(base.flags)
    if rng.random() < 0.1:
        flags = [not f for f in flags]
        desc += ", zstd flags flipped"
    return base.rewrite(base.fields, sections, flags), desc


def wrong_codec(rng, base, bases):
    """An intact blob, read by another codec (``make_case`` swaps the codec): it must be refused."""
    return base.blob, "intact blob, another codec"


MUTATORS = {
    "bit_flip": (bit_flip, 8), "byte_overwrite": (byte_overwrite, 8), "truncate": (truncate, 5),
    "extend": (extend, 5), "splice": (splice, 6), "duplicate": (duplicate, 5), "random_bytes": (random_bytes, 3),
    "prefix": (prefix_edit, 4), "header_field": (header_field, 18), "section_table": (section_table, 9),
    "header_text": (header_text, 8), "payload_crc": (payload_crc, 8), "section_edit": (section_edit, 12),
    "wrong_codec": (wrong_codec, 1),
}
BYTE_LEVEL = ("bit_flip", "byte_overwrite", "truncate", "extend", "splice", "duplicate")
_NAMES = list(MUTATORS)
_WEIGHTS = [MUTATORS[k][1] for k in _NAMES]


@dataclass
class Case:
    index: int
    kind: str  # mutation kind; byte-level kinds carry "+crc" when the CRC was recomputed
    base: str
    codec: str  # key of the codec that decodes it
    data: bytes
    desc: str
    foreign: bool = False  # decoded by a codec other than the one that wrote it: must be refused


def make_case(index: int, seed: int, bases: list[Base], codecs: list[str] | None = None) -> Case:
    """Blob ``index`` of the run with ``seed``: a pure function of its arguments."""
    rng = random.Random(f"kvcal-fuzz/{seed}/{index}")
    kind = rng.choices(_NAMES, _WEIGHTS)[0]
    base = rng.choice(bases)
    data, desc = MUTATORS[kind][0](rng, base, bases)
    codec = base.codec
    if kind == "wrong_codec":
        others = [c for c in (codecs or sorted({b.codec for b in bases})) if c != base.codec]
        if others:
            codec = rng.choice(others)
    if kind in BYTE_LEVEL and rng.random() < 0.5:
        data = resign(data)
        kind += "+crc"
    return Case(index, kind, base.name, codec, bytes(data), desc, foreign=codec != base.codec)


def _short(value: Any, chars: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= chars else text[: chars - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# The invariant


def check_decode(codec, data: bytes, must_refuse: bool = False) -> tuple[str, str, float]:
    """``(outcome, detail, seconds)`` of ``codec.decompress(data)``; outcome in OK_OUTCOMES or FAIL_OUTCOMES."""
    import torch

    from kvcal.codec.geometry import DTYPES
    from kvcal.errors import KvcalError

    start = time.perf_counter()
    try:
        cache = codec.decompress(data)
    except KvcalError as err:  # BitstreamError is one
        seconds = time.perf_counter() - start
        message = str(err)
        if not message.strip() or "\n" in message or "\r" in message:
            return "multiline_error", f"{type(err).__name__}: {message[:200]!r}", seconds
        return "refused", message, seconds
    except MemoryError:
        return "blowup", "MemoryError", time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - any other exception is the failure being looked for
        seconds = time.perf_counter() - start
        if isinstance(err, RuntimeError) and "allocate" in str(err):
            return "blowup", f"{type(err).__name__}: {str(err).splitlines()[0][:160]}", seconds
        tb = traceback.extract_tb(err.__traceback__)[-1]
        where = f"{Path(tb.filename).name}:{tb.lineno}"
        return "other_exception", f"{type(err).__name__} at {where}: {str(err).splitlines()[0][:160] if str(err) else ''}", seconds
    seconds = time.perf_counter() - start
    if must_refuse:
        return "accepted_foreign", "another codec's blob decoded", seconds
    _, _, header_len = PREFIX.unpack_from(data)
    header = json.loads(data[PREFIX.size : PREFIX.size + header_len])
    layout = codec.layout
    dtype = DTYPES[header["dtype"]]
    if len(cache.layers) != layout.num_layers:
        return "bad_shape", f"{len(cache.layers)} layers, header implies {layout.num_layers}", seconds
    for i, layer in enumerate(cache.layers):
        want = (header["batch"], layout.num_kv_heads, header["layer_lens"][i])
        for name, t, d in (("keys", layer.keys, layout.head_dim), ("values", layer.values, layout.v_head_dim)):
            if tuple(t.shape) != (*want, d) or t.dtype != dtype:
                return "bad_shape", f"layer {i} {name} {tuple(t.shape)} {t.dtype}, header implies {(*want, d)} {dtype}", seconds
            if not bool(torch.isfinite(t).all()):
                return "nonfinite", f"layer {i} {name}: {int((~torch.isfinite(t)).sum())} non-finite values", seconds
    return "decoded", "", seconds


def refusal_reason(message: str) -> str:
    """A refusal message with numbers and quoted values blanked, to count refusals by reason."""
    text = re.sub(r"'[^']*'", "'…'", message)
    text = re.sub(r"\d+", "#", text)
    return text[:90]


# ---------------------------------------------------------------------------------------------------------------
# Models, codecs, caches and the bases


@dataclass(frozen=True)
class CodecSpec:
    family: str
    model_dir: str
    entropy: str
    ratio: float

    @property
    def key(self) -> str:
        return f"{self.family}/{self.entropy}@{self.ratio:g}"

    def load(self):
        import kvcal

        return kvcal.load(self.model_dir, ratio=self.ratio, entropy=self.entropy)


CODEC_SETTINGS = (("rans", 4.0), ("ans", 4.0), ("zstd", 4.0), ("rans", 8.0))
# (name, tokens, batch, left pad of item 1, position offset, dtype)
CACHE_SHAPES = (
    ("n1b1", 1, 1, 0, 0, "float32"), ("n5b1", 5, 1, 0, 0, "float32"), ("n36b1", 36, 1, 0, 0, "float32"),
    ("n37b1", 37, 1, 0, 0, "float32"), ("n64b2", 64, 2, 0, 0, "float32"), ("n80b2pad", 80, 2, 30, 0, "float32"),
    ("n40b1off", 40, 1, 0, 900, "float32"), ("n48b1f16", 48, 1, 0, 0, "float16"),
    ("n48b1bf16", 48, 1, 0, 0, "bfloat16"), ("n120b1", 120, 1, 0, 0, "float32"),
)


def prepare_models(families: list[str], model_dirs: list[str], root: Path) -> dict[str, str]:
    """``{family: calibrated model dir}``: the given dirs, or tiny models calibrated as the tests do."""
    import kvcal

    out: dict[str, str] = {}
    for d in model_dirs:
        path = Path(d)
        if not (path / "kvcal").is_dir():
            raise SystemExit(f"{path} holds no kvcal/ artifact: calibrate it first, or leave out --model-dir")
        out[json.loads((path / "config.json").read_text())["model_type"]] = str(path)
    if out:
        return out
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import EVAL_CORPUS, TINY_CAL
    from fixtures import write_tiny_model

    for family in families:
        model_dir = write_tiny_model(family, root / family)
        kvcal.calibrate(model_dir, data=[EVAL_CORPUS], device="cpu", progress=False, **TINY_CAL)
        out[family] = str(model_dir)
    return out


def real_caches(model_dir: str, shapes=CACHE_SHAPES) -> list[dict]:
    """Prefilled caches of corpus text, each ``{name, kv, cache, mask, offsets}`` (``kv``: per-layer tensors)."""
    import copy

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_codec import text_ids

    from kvcal.codec.geometry import DTYPES
    from kvcal.models import load_model

    model, tokenizer = load_model(model_dir, "cpu")
    out = []
    for seed, (name, n, batch, pad, offset, dtype) in enumerate(shapes):
        ids = text_ids(tokenizer, n, batch, seed=seed)
        mask = None
        kwargs: dict[str, Any] = {}
        if pad:
            mask = torch.ones(batch, n, dtype=torch.long)
            mask[1, :pad] = 0
            ids[1, :pad] = 0
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        if offset:
            kwargs["position_ids"] = torch.arange(offset, offset + n)[None].expand(batch, n)
        with torch.no_grad():
            cache = model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs).past_key_values
        if dtype != "float32":
            cache = copy.deepcopy(cache)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.to(DTYPES[dtype]), layer.values.to(DTYPES[dtype])
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        out.append({"name": name, "kv": kv, "cache": cache, "mask": mask, "offsets": [offset] * batch if offset else None})
    return out


def compress_bases(specs: list[CodecSpec], caches: dict[str, list[dict]], codecs: dict | None = None
                   ) -> tuple[list[Base], dict[str, Any]]:
    """Every cache of a family through each of its codecs: the bases, plus the twice-compressed check."""
    codecs = codecs if codecs is not None else {spec.key: spec.load() for spec in specs}
    bases, twice = [], {}
    for spec in specs:
        codec = codecs[spec.key]
        for c in caches[spec.family]:
            blob = codec.compress(c["cache"], attention_mask=c["mask"], position_offsets=c["offsets"])
            again = codec.compress(c["cache"], attention_mask=c["mask"], position_offsets=c["offsets"])
            as_list = codec.compress(c["kv"], attention_mask=c["mask"], position_offsets=c["offsets"])
            name = f"{spec.key}/{c['name']}"
            # A list of (keys, values) says nothing of sliding windows; for full-attention models it is the same cache.
            twice[name] = blob == again and (as_list == blob or any(layer.is_sliding for layer in c["cache"].layers))
            bases.append(Base.from_blob(name, spec.key, blob))
    return bases, twice


def blob_digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:16]


def decoded_digest(cache) -> str:
    h = hashlib.sha256()
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            h.update(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def determinism_child(path: str, threads: int) -> None:
    """Subprocess side of the thread-count check: compress the saved tensors, print digests as JSON."""
    import torch

    torch.set_num_threads(threads)
    saved = torch.load(path, weights_only=False)
    out = {}
    codecs = {}
    for item in saved["items"]:
        spec = CodecSpec(**item["spec"])
        codec = codecs.setdefault(spec.key, spec.load())
        blob = codec.compress(item["kv"], attention_mask=item["mask"], position_offsets=item["offsets"])
        out[item["name"]] = {"blob": blob_digest(blob), "decoded": decoded_digest(codec.decompress(blob))}
    print(json.dumps({"threads": torch.get_num_threads(), "digests": out}))


def check_determinism(specs: list[CodecSpec], caches: dict[str, list[dict]], codecs: dict, twice: dict,
                      tmp: Path, threads: int) -> dict:
    import torch

    items, here = [], {}
    for spec in specs:
        for c in caches[spec.family]:
            name = f"{spec.key}/{c['name']}"
            blob = codecs[spec.key].compress(c["kv"], attention_mask=c["mask"], position_offsets=c["offsets"])
            here[name] = {"blob": blob_digest(blob), "decoded": decoded_digest(codecs[spec.key].decompress(blob))}
            items.append({"name": name, "spec": spec.__dict__, "kv": c["kv"], "mask": c["mask"], "offsets": c["offsets"]})
    path = tmp / "determinism.pt"
    torch.save({"items": items}, path)
    proc = subprocess.run([sys.executable, __file__, "--determinism-child", str(path), "--threads", str(threads)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    if proc.returncode:
        raise SystemExit(f"determinism subprocess failed:\n{proc.stderr[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    mismatched = sorted(n for n in here if here[n] != child["digests"].get(n))
    return {
        "caches": len(here),
        "compressed_twice_identical": all(twice.values()),
        "compressed_twice_mismatches": sorted(n for n, ok in twice.items() if not ok),
        "threads_here": torch.get_num_threads(),
        "threads_subprocess": child["threads"],
        "subprocess_identical_blobs_and_decodes": not mismatched,
        "subprocess_mismatches": mismatched,
    }


# ---------------------------------------------------------------------------------------------------------------
# Workers: a small hand-rolled pool, so that a hung blob's worker can be killed and replaced


def worker_main(wid: int, specs: list[CodecSpec], base_blobs: list[tuple[str, str, bytes]], seed: int,
                mem_bytes: int, tasks, results, current, started) -> None:
    import torch

    torch.set_num_threads(1)
    codecs = {spec.key: spec.load() for spec in specs}
    bases = [Base.from_blob(*b) for b in base_blobs]
    keys = sorted(codecs)
    for base in bases:  # warm up (ANS tables, RoPE tables) and check every intact base decodes
        outcome, detail, _ = check_decode(codecs[base.codec], base.blob)
        if outcome != "decoded":
            results.put(("fatal", wid, f"intact base {base.name} gives {outcome}: {detail}"))
            return
    if mem_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    results.put(("ready", wid, None))
    while True:
        batch = tasks.get()
        if batch is None:
            return
        batch_id, indices = batch
        rows = []
        reasons: collections.Counter = collections.Counter()
        for index in indices:
            started.value = time.monotonic()
            current.value = index
            try:
                case = make_case(index, seed, bases, keys)
            except Exception as err:  # noqa: BLE001 - a mutator bug must not look like a codec failure
                rows.append((index, "generator_error", "", "other_exception", f"generator: {err!r}", 0.0, ""))
                continue
            started.value = time.monotonic()  # the timeout is the decoder's: making the blob had its own
            outcome, detail, seconds = check_decode(codecs[case.codec], case.data, must_refuse=case.foreign)
            if outcome == "refused":
                reasons[refusal_reason(detail)] += 1
                detail = ""
            rows.append((index, case.kind, case.base, outcome, detail, seconds,
                         case.desc if outcome not in OK_OUTCOMES else ""))
        current.value = -1
        results.put(("done", wid, (batch_id, rows, reasons)))


class Pool:
    def __init__(self, n: int, args: tuple, timeout: float):
        self.ctx = mp.get_context("spawn")
        self.args = args
        self.timeout = timeout
        self.results = self.ctx.Queue()
        self.workers: list[dict] = [self._start(i) for i in range(n)]
        self.restarts = 0

    def _start(self, wid: int) -> dict:
        tasks = self.ctx.Queue()
        current = self.ctx.Value("q", -1, lock=False)
        started = self.ctx.Value("d", 0.0, lock=False)
        proc = self.ctx.Process(target=worker_main, args=(wid, *self.args, tasks, self.results, current, started),
                                daemon=True)
        proc.start()
        return {"proc": proc, "tasks": tasks, "current": current, "started": started, "batch": None, "ready": False}

    def restart(self, wid: int) -> None:
        old = self.workers[wid]
        if old["proc"].is_alive():
            old["proc"].kill()
        old["proc"].join(5)
        self.workers[wid] = self._start(wid)
        self.restarts += 1

    def close(self) -> None:
        for w in self.workers:
            if w["proc"].is_alive():
                w["tasks"].put(None)
        for w in self.workers:
            w["proc"].join(10)
            if w["proc"].is_alive():
                w["proc"].kill()


def run_pool(args, specs, bases, progress) -> tuple[list[tuple], collections.Counter, int]:
    """All blobs through the pool: every result row, the refusal reasons and the number of worker restarts."""
    base_blobs = [(b.name, b.codec, b.blob) for b in bases]
    mem = int(args.mem_gib * (1 << 30)) if args.mem_gib > 0 else 0
    pool = Pool(args.workers, (specs, base_blobs, args.seed, mem), args.timeout)
    pending: collections.deque = collections.deque()
    size = args.batch_size
    for batch_id, lo in enumerate(range(0, args.blobs, size)):
        pending.append((batch_id, list(range(lo, min(lo + size, args.blobs)))))
    rows: list[tuple] = []
    reasons: collections.Counter = collections.Counter()
    outstanding = len(pending)
    try:
        while outstanding:
            for w in pool.workers:
                if w["ready"] and w["batch"] is None and pending:
                    w["batch"] = pending.popleft()
                    w["tasks"].put(w["batch"])
            try:
                kind, wid, payload = pool.results.get(timeout=0.05)
            except queue.Empty:
                kind = None
            if kind == "fatal":
                raise SystemExit(f"worker {wid} could not start: {payload}")
            if kind == "ready":
                pool.workers[wid]["ready"] = True
            elif kind == "done":
                batch_id, batch_rows, batch_reasons = payload
                w = pool.workers[wid]
                if w["batch"] is not None and w["batch"][0] == batch_id:
                    w["batch"] = None
                    rows.extend(batch_rows)
                    reasons.update(batch_reasons)
                    outstanding -= 1
                    progress.update(len(batch_rows))
            now = time.monotonic()
            for wid, w in enumerate(pool.workers):
                if w["batch"] is None:
                    if not w["proc"].is_alive():
                        raise SystemExit(f"worker {wid} died while idle (exit code {w['proc'].exitcode})")
                    continue
                index = w["current"].value
                alive = w["proc"].is_alive()
                hung = index >= 0 and now - w["started"].value > args.timeout
                if alive and not hung:
                    continue
                # Record the blob it was on, and hand the rest of its batch to the queue again.
                outcome = "hang" if alive else "crash"
                detail = (f"over {args.timeout:g} s" if alive else f"worker exit code {w['proc'].exitcode}")
                batch_id, indices = w["batch"]
                try:
                    case = make_case(index, args.seed, bases, sorted({b.codec for b in bases}))
                    kind_, base_, desc = case.kind, case.base, case.desc
                except Exception:  # noqa: BLE001
                    kind_, base_, desc = "?", "?", ""
                if index >= 0:
                    rows.append((index, kind_, base_, outcome, detail, args.timeout if alive else 0.0, desc))
                    progress.update(1)
                rest = [i for i in indices if i != index]
                if rest:
                    pending.appendleft((batch_id, rest))
                else:
                    outstanding -= 1
                w["batch"] = None
                pool.restart(wid)
    finally:
        pool.close()
    return rows, reasons, pool.restarts


# ---------------------------------------------------------------------------------------------------------------
# Report


def versions() -> dict:
    import constriction  # noqa: F401
    import numpy
    import torch
    import transformers
    import zstandard

    import kvcal

    try:
        from importlib.metadata import version

        constriction_version = version("constriction")
    except Exception:  # noqa: BLE001
        constriction_version = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "kvcal"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = "?", False
    return {"kvcal": kvcal.__version__, "git_commit": commit, "kvcal_tree_modified": dirty,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "constriction": constriction_version, "zstandard": zstandard.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count()}


def summarise(rows: list[tuple], reasons: collections.Counter) -> dict:
    per_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_base: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    failures = []
    slowest = (0.0, -1)
    decode_seconds = 0.0
    for index, kind, base, outcome, detail, seconds, desc in rows:
        per_kind[kind][outcome] += 1
        per_base[base][outcome] += 1
        totals[outcome] += 1
        if outcome not in ("hang", "crash"):
            slowest = max(slowest, (seconds, index))
            decode_seconds += seconds
        if outcome not in OK_OUTCOMES:
            failures.append({"index": index, "kind": kind, "base": base, "outcome": outcome, "detail": detail,
                             "mutation": desc})
    failures.sort(key=lambda f: f["index"])
    timed = sum(v for k, v in totals.items() if k not in ("hang", "crash"))
    return {
        "totals": {k: totals.get(k, 0) for k in (*OK_OUTCOMES, *FAIL_OUTCOMES)},
        "failures_total": sum(totals[k] for k in FAIL_OUTCOMES),
        "per_kind": {k: dict(sorted(v.items())) for k, v in sorted(per_kind.items())},
        "per_base": {k: dict(sorted(v.items())) for k, v in sorted(per_base.items())},
        "max_decode_seconds": round(slowest[0], 6),
        "max_decode_index": slowest[1],
        "mean_decode_ms": round(1000 * decode_seconds / max(1, timed), 4),
        "refusal_reasons_top": [{"reason": r, "count": c} for r, c in reasons.most_common(40)],
        "refusal_reasons_distinct": len(reasons),
        "failures": failures[:500],
    }


def write_markdown(path: Path, report: dict) -> None:
    s = report["summary"]
    outcomes = [k for k in (*OK_OUTCOMES, *FAIL_OUTCOMES) if s["totals"].get(k) or k in OK_OUTCOMES]
    lines = [
        "# Codec fuzz: `KVTCCodec.decompress` on mutated blobs",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['settings']['blobs']} blobs (seed {report['settings']['seed']}) from {len(report['bases'])} real "
        f"blobs ({', '.join(report['models'])}; codecs {', '.join(report['codecs'])}); "
        f"{report['settings']['workers']} workers, {report['settings']['timeout_s']:g} s per blob, "
        f"{report['settings']['mem_gib']:g} GiB address space per worker. Wall time {report['wall_seconds']:.0f} s.",
        "",
        f"**Failures: {s['failures_total']}** (hangs {s['totals']['hang']}, blow-ups {s['totals']['blowup']}, "
        f"crashes {s['totals']['crash']}, other exceptions {s['totals']['other_exception']}, non-finite "
        f"{s['totals']['nonfinite']}, bad shapes {s['totals']['bad_shape']}). Max decode time "
        f"{s['max_decode_seconds'] * 1000:.1f} ms (blob {s['max_decode_index']}), mean {s['mean_decode_ms']:.2f} ms.",
        "",
        "| mutation | " + " | ".join(outcomes) + " | total |",
        "|---|" + "---:|" * (len(outcomes) + 1),
    ]
    for kind, counts in s["per_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(o, 0)) for o in outcomes)
                     + f" | {sum(counts.values())} |")
    lines.append("| **all** | " + " | ".join(f"**{s['totals'].get(o, 0)}**" for o in outcomes)
                 + f" | **{sum(s['totals'].values())}** |")
    d = report["determinism"]
    lines += [
        "",
        "`decoded` = a cache with every tensor finite and shaped as its header says; `refused` = a one-line "
        "`BitstreamError`/`KvcalError`. Byte-level kinds marked `+crc` had their CRC recomputed; `header_field`, "
        "`section_table`, `header_text`, `prefix`, `payload_crc` and `section_edit` always carry a valid CRC, so "
        "they reach the validators and decoders behind it. `wrong_codec` feeds an intact blob to another codec "
        "(it must be refused).",
        "",
        "## Determinism",
        "",
        f"- {d['caches']} caches compressed twice: identical bytes: **{d['compressed_twice_identical']}**",
        f"- fresh subprocess, `torch.set_num_threads({d['threads_subprocess']})` (here {d['threads_here']}): "
        f"identical blobs and decoded tensors: **{d['subprocess_identical_blobs_and_decodes']}**",
        "",
        "## Most frequent refusals",
        "",
        "| count | message (numbers as #) |",
        "|---:|---|",
    ]
    for r in s["refusal_reasons_top"][:15]:
        lines.append(f"| {r['count']} | {r['reason'].replace('|', '/')} |")
    if s["failures"]:
        lines += ["", "## Failures (first 30)", "", "| index | kind | base | outcome | detail | mutation |",
                  "|---:|---|---|---|---|---|"]
        for f in s["failures"][:30]:
            lines.append(f"| {f['index']} | {f['kind']} | {f['base']} | {f['outcome']} | "
                         f"{f['detail'][:100].replace('|', '/')} | {f['mutation'][:60].replace('|', '/')} |")
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.", ""]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blobs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per blob before its worker is killed (a hang)")
    p.add_argument("--mem-gib", type=float, default=3.0, help="RLIMIT_AS per worker, GiB (0: no cap)")
    p.add_argument("--batch-size", type=int, default=250, help="blobs per task sent to a worker")
    p.add_argument("--family", nargs="+", default=["llama", "gemma2"],
                   help="tiny model families to calibrate (tests/fixtures.py); gemma2 adds sliding-window layers")
    p.add_argument("--model-dir", action="append", default=[], help="calibrated model dir(s) to use instead")
    p.add_argument("--out", default="results/fuzz", help="writes OUT.json and OUT.md")
    p.add_argument("--replay", type=int, nargs="+", help="run these blob indices in-process and explain them")
    p.add_argument("--determinism-threads", type=int, default=2)
    p.add_argument("--determinism-child", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.determinism_child:
        determinism_child(args.determinism_child, args.threads)
        return 0
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    started = time.time()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="kvcal-fuzz-") as tmp:
        t = time.time()
        models = prepare_models(args.family, args.model_dir, Path(tmp))
        specs = [CodecSpec(family, d, entropy, ratio) for family, d in models.items() for entropy, ratio in CODEC_SETTINGS]
        caches = {family: real_caches(d) for family, d in models.items()}
        codecs = {spec.key: spec.load() for spec in specs}
        bases, twice = compress_bases(specs, caches, codecs)
        setup_seconds = time.time() - t
        print(f"{len(bases)} bases from {len(models)} model(s) in {setup_seconds:.0f} s", file=sys.stderr)

        if args.replay:
            keys = sorted(codecs)
            for index in args.replay:
                case = make_case(index, args.seed, bases, keys)
                print(f"blob {index}: {case.kind} of {case.base} ({case.desc}), {len(case.data)} bytes, codec {case.codec}")
                try:
                    codecs[case.codec].decompress(case.data)
                    print("  decoded")
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                print("  ->", check_decode(codecs[case.codec], case.data, must_refuse=case.foreign))
            return 0

        t = time.time()
        determinism = check_determinism(specs, caches, codecs, twice, Path(tmp), args.determinism_threads)
        determinism["seconds"] = round(time.time() - t, 1)
        print(f"determinism: {determinism}", file=sys.stderr)

        t = time.time()
        with tqdm(total=args.blobs, unit="blob", smoothing=0.05) as progress:
            rows, reasons, restarts = run_pool(args, specs, bases, progress)
        fuzz_seconds = time.time() - t

    summary = summarise(rows, reasons)
    indices = sorted(r[0] for r in rows)
    complete = indices == list(range(args.blobs))
    report = {
        "command": command,
        "settings": {"blobs": args.blobs, "seed": args.seed, "workers": args.workers, "timeout_s": args.timeout,
                     "mem_gib": args.mem_gib, "batch_size": args.batch_size},
        "models": sorted(models),
        "codecs": [spec.key for spec in specs],
        "bases": [{"name": b.name, "bytes": len(b.blob), "batch": b.header["batch"], "seq_len": b.header["seq_len"],
                   "dtype": b.header["dtype"], "sections": len(b.header["sections"])} for b in bases],
        "mutation_weights": {k: w for k, (_, w) in MUTATORS.items()},
        "all_blobs_accounted": complete,
        "worker_restarts": restarts,
        "summary": summary,
        "determinism": determinism,
        "setup_seconds": round(setup_seconds, 1),
        "fuzz_seconds": round(fuzz_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "versions": versions(),
    }
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(out.with_suffix(".md"), report)
    ok = (summary["failures_total"] == 0 and complete and determinism["compressed_twice_identical"]
          and determinism["subprocess_identical_blobs_and_decodes"])
    t = summary["totals"]
    print(f"{args.blobs} blobs: {t['refused']} refused, {t['decoded']} decoded, {summary['failures_total']} failures "
          f"(hangs {t['hang']}, blow-ups {t['blowup']}, crashes {t['crash']}); max decode "
          f"{summary['max_decode_seconds'] * 1000:.1f} ms; fuzz {fuzz_seconds:.0f} s, wall {report['wall_seconds']:.0f} s; "
          f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}.json/.md",
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
