"""The blob container: round trips, determinism, and refusal of truncated, corrupted and hostile blobs."""

from __future__ import annotations

import array
import json
import random
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcal.codec.bitstream import (
    FORMAT_VERSION,
    MAGIC,
    MIN_BLOB_BYTES,
    Limits,
    read_blob,
    require_int,
    require_list,
    require_str,
    section_sizes,
    write_blob,
)
from kvcal.errors import BitstreamError, KvcalError

SAMPLES: list[tuple[dict[str, Any], list[tuple[str, bytes]], bool | list[bool]]] = [
    ({"model": "tiny", "layers": 2, "ratio": 8.0}, [("k0", b"\x01\x02" * 40), ("v0", bytes(range(97)))], True),
    ({"kind": "mixed", "dims": [4, 8]}, [("a", b"abc" * 20), ("b", b""), ("c", b"\xff" * 33)], [True, False, True]),
    ({}, [("only", b"uncompressed payload")], False),
    ({"empty": True}, [], True),
    ({"names": ["x", "y"], "nested": {"deep": [1, {"z": None}]}}, [(f"s{i}", bytes([i]) * i) for i in range(6)], True),
]


def sample_blobs() -> list[tuple[bytes, tuple[dict[str, Any], dict[str, bytes]]]]:
    blobs = []
    for header, sections, compress in SAMPLES:
        blob = write_blob(header, sections, compress=compress)
        blobs.append((blob, (json.loads(json.dumps(header)), dict(sections))))
    return blobs


def forge(
    header: Any = None,
    payload: bytes = b"",
    *,
    header_bytes: bytes | None = None,
    version: int = FORMAT_VERSION,
    header_len: int | None = None,
) -> bytes:
    """A blob with any header and payload and a correct CRC, for reaching the checks behind the checksum."""
    if header_bytes is None:
        header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    declared_len = len(header_bytes) if header_len is None else header_len
    body = struct.pack("<8sHI", MAGIC, version, declared_len) + header_bytes + payload
    return body + struct.pack("<I", zlib.crc32(body))


def entry(name: str, offset: int, stored: int, raw: int, zstd: bool = False) -> dict[str, Any]:
    return {"name": name, "offset": offset, "stored": stored, "raw": raw, "zstd": zstd}


def with_crc(body: bytes) -> bytes:
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


def peak_traced_bytes(action: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def zeros_frame(size: int) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(size))


def with_frame_content_size(frame: bytes, content_size: int) -> bytes:
    """Rewrite the 4-byte content-size field of a single-segment frame, as a hostile writer would."""
    descriptor = frame[4]
    assert descriptor >> 6 == 2 and descriptor & 0x20, "expected a single-segment frame with a 4-byte size field"
    return frame[:5] + struct.pack("<I", content_size) + frame[9:]


# ---------------------------------------------------------------------------------------------------------------
# Round trips and determinism


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_round_trip(index: int) -> None:
    blob, (header, sections) = sample_blobs()[index]
    decoded_header, decoded_sections = read_blob(blob)
    assert decoded_header == header
    assert decoded_sections == sections
    assert list(decoded_sections) == list(sections)


def test_round_trip_from_memoryview_and_bytearray() -> None:
    blob, expected = sample_blobs()[1]
    assert read_blob(memoryview(blob)) == expected
    assert read_blob(bytearray(blob)) == expected


def test_many_sections_up_to_the_limit() -> None:
    limit = Limits().max_sections
    sections = [(f"layer{i}", i.to_bytes(4, "little")) for i in range(limit)]
    header, decoded = read_blob(write_blob({"n": limit}, sections))
    assert header == {"n": limit}
    assert decoded == dict(sections)
    with pytest.raises(BitstreamError, match="sections"):
        write_blob({}, [*sections, ("one-too-many", b"")])


def test_large_compressible_section() -> None:
    data = bytes(1 << 20) + b"tail"
    blob = write_blob({}, [("big", data)])
    assert len(blob) < 1000
    assert read_blob(blob)[1]["big"] == data


def test_sections_accept_any_contiguous_buffer() -> None:
    words = array.array("I", [1, 2, 3])
    assert read_blob(write_blob({}, [("w", words)]))[1]["w"] == words.tobytes()


def test_same_input_gives_identical_bytes() -> None:
    for header, sections, compress in SAMPLES:
        assert write_blob(header, sections, compress=compress) == write_blob(header, sections, compress=compress)
    assert write_blob({"a": 1, "b": 2}, [("s", b"x" * 100)]) == write_blob({"b": 2, "a": 1}, [("s", b"x" * 100)])


def test_layout_matches_the_documented_format() -> None:
    header_json = b'{"k":"v","sections":[{"name":"a","offset":0,"raw":3,"stored":3,"zstd":false}]}'
    body = MAGIC + struct.pack("<HI", FORMAT_VERSION, len(header_json)) + header_json + b"xyz"
    assert write_blob({"k": "v"}, [("a", b"xyz")], compress=False) == body + struct.pack("<I", zlib.crc32(body))


def test_section_sizes() -> None:
    blob = write_blob({}, [("z", bytes(5000)), ("u", b"abc"), ("e", b"")], compress=[True, False, True])
    sizes = section_sizes(blob)
    assert list(sizes) == ["z", "u", "e"]
    assert sizes["z"]["raw"] == 5000 and sizes["z"]["compressed"] and sizes["z"]["stored"] < 100
    assert sizes["u"] == {"stored": 3, "raw": 3, "compressed": False}
    assert sizes["e"]["raw"] == 0 and sizes["e"]["compressed"]
    with pytest.raises(BitstreamError):
        section_sizes(blob[:-1])


# ---------------------------------------------------------------------------------------------------------------
# Truncation and random corruption


def test_every_truncation_is_refused_as_truncated() -> None:
    blob = sample_blobs()[1][0]
    for length in range(len(blob)):
        with pytest.raises(BitstreamError, match="truncated"):
            read_blob(blob[:length])


def test_truncated_payload_message_names_both_lengths() -> None:
    blob = sample_blobs()[0][0]
    with pytest.raises(BitstreamError, match=rf"truncated: {len(blob) - 7} bytes, header says {len(blob)}$"):
        read_blob(blob[:-7])


def test_trailing_bytes_are_refused() -> None:
    blob = sample_blobs()[0][0]
    with pytest.raises(BitstreamError, match="3 unexpected bytes after its end"):
        read_blob(blob + b"\x00\x01\x02")


def mutate(blob: bytes, rng: random.Random) -> bytes:
    data = bytearray(blob)
    kind = rng.randrange(7)
    if kind == 0:
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    elif kind == 1:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 2:
        position = rng.randrange(len(data) + 1)
        data[position:position] = rng.randbytes(rng.randint(1, 16))
    elif kind == 3:
        start = rng.randrange(len(data))
        del data[start : start + rng.randint(1, 16)]
    elif kind == 4:
        del data[rng.randrange(len(data)) :]
    elif kind == 5:
        garbage = rng.randbytes(rng.randint(0, 64))
        data = bytearray(MAGIC + garbage if rng.random() < 0.5 else garbage)
    else:
        data = bytearray(swap_two_sections(bytes(data), rng))
    return bytes(data)


def swap_two_sections(blob: bytes, rng: random.Random) -> bytes:
    """Exchange the payload bytes of two sections, leaving the header as it was."""
    header_len = struct.unpack_from("<I", blob, 10)[0]
    table = json.loads(blob[14 : 14 + header_len])["sections"]
    if len(table) < 2:
        return blob[::-1]
    first, second = sorted(rng.sample(range(len(table)), 2))
    payload = bytearray(blob[14 + header_len : -4])
    spans = [payload[s["offset"] : s["offset"] + s["stored"]] for s in table]
    spans[first], spans[second] = spans[second], spans[first]
    return blob[: 14 + header_len] + b"".join(spans) + blob[-4:]


def test_seeded_fuzz_of_mutations() -> None:
    rng = random.Random(20240611)
    samples = sample_blobs()
    for _ in range(2400):
        blob, expected = rng.choice(samples)
        mutated = mutate(blob, rng)
        try:
            decoded = read_blob(mutated)
        except BitstreamError:
            continue
        assert decoded == expected


def test_seeded_fuzz_with_recomputed_checksum() -> None:
    """Past the CRC, the structural checks alone must stop everything that is not a well-formed blob."""
    rng = random.Random(7)
    samples = sample_blobs()
    decoded_count = 0
    for _ in range(1200):
        blob, _ = rng.choice(samples)
        mutated = mutate(blob, rng)
        if len(mutated) >= MIN_BLOB_BYTES:
            mutated = with_crc(mutated)
        try:
            header, sections = read_blob(mutated)
        except BitstreamError:
            continue
        decoded_count += 1
        assert isinstance(header, dict) and "sections" not in header
        assert all(isinstance(data, bytes) for data in sections.values())
        assert {name: len(data) for name, data in sections.items()} == {
            name: sizes["raw"] for name, sizes in section_sizes(mutated).items()
        }
    assert decoded_count > 0  # payload edits of uncompressed sections legitimately decode


HEADER_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
HEADERS = st.dictionaries(st.text(max_size=8).filter(lambda key: key != "sections"), HEADER_VALUES, max_size=4)
SECTIONS = st.lists(
    st.tuples(st.text(min_size=1, max_size=12), st.binary(max_size=300), st.booleans()),
    max_size=5,
    unique_by=lambda section: section[0],
)
PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(header=HEADERS, sections=SECTIONS)
def test_property_round_trip(header: dict[str, Any], sections: list[tuple[str, bytes, bool]]) -> None:
    blob = write_blob(header, [(name, data) for name, data, _ in sections], compress=[flag for *_, flag in sections])
    decoded_header, decoded_sections = read_blob(blob)
    assert decoded_header == json.loads(json.dumps(header))
    assert decoded_sections == {name: data for name, data, _ in sections}


@PROPERTY_SETTINGS
@given(sections=SECTIONS, position=st.integers(min_value=0), junk=st.binary(min_size=1, max_size=8))
def test_property_any_splice_is_refused_or_harmless(
    sections: list[tuple[str, bytes, bool]], position: int, junk: bytes
) -> None:
    blob = write_blob({"h": 1}, [(name, data) for name, data, _ in sections], compress=[f for *_, f in sections])
    position %= len(blob)
    for mutated in (blob[:position] + junk + blob[position + len(junk) :], blob[:position] + junk + blob[position:]):
        try:
            decoded = read_blob(mutated)
        except BitstreamError:
            continue
        assert decoded == ({"h": 1}, {name: data for name, data, _ in sections})


# ---------------------------------------------------------------------------------------------------------------
# Foreign, short and newer blobs


@pytest.mark.parametrize("blob", [b"", b"KVC", MAGIC, MAGIC + b"\x01\x00"])
def test_short_blobs_are_truncated(blob: bytes) -> None:
    with pytest.raises(BitstreamError, match="truncated"):
        read_blob(blob)


@pytest.mark.parametrize("blob", [b"PK\x03\x04" + bytes(40), b"x", b"KVCALKV\x01" + bytes(40)])
def test_foreign_bytes_are_not_a_kvcal_blob(blob: bytes) -> None:
    with pytest.raises(BitstreamError, match="not a kvcal blob"):
        read_blob(blob)


@pytest.mark.parametrize("value", [None, "KVCALKV", 12, [1, 2], memoryview(b"abcd").cast("B", (2, 2))[::2]])
def test_non_buffers_are_refused(value: Any) -> None:
    with pytest.raises(BitstreamError):
        read_blob(value)


def test_newer_format_version_says_upgrade() -> None:
    newer = forge({"sections": []}, version=FORMAT_VERSION + 1)
    with pytest.raises(BitstreamError, match=rf"format version {FORMAT_VERSION + 1}.*upgrade kvcal"):
        read_blob(newer)
    with pytest.raises(BitstreamError, match="upgrade kvcal"):  # checked before the CRC it may not share with us
        read_blob(newer[:-1] + b"\x00")


def test_version_zero_is_unknown() -> None:
    with pytest.raises(BitstreamError, match="unknown format version 0"):
        read_blob(forge({"sections": []}, version=0))


def test_checksum_mismatch_says_corrupted() -> None:
    blob = bytearray(sample_blobs()[0][0])
    blob[-10] ^= 0x40
    with pytest.raises(BitstreamError, match="checksum mismatch: the data is corrupted"):
        read_blob(bytes(blob))


def test_forged_minimal_blob_is_accepted() -> None:
    assert read_blob(forge({"sections": []})) == ({}, {})


# ---------------------------------------------------------------------------------------------------------------
# Hostile blobs with a valid checksum


def refused(blob: bytes, match: str, limits: Limits | None = None) -> None:
    with pytest.raises(BitstreamError, match=match):
        read_blob(blob, limits or Limits())


@pytest.mark.parametrize(
    ("header_bytes", "match"),
    [
        (b"[]", "must be a JSON object, got list"),
        (b"1", "must be a JSON object, got int"),
        (b'"sections"', "must be a JSON object, got str"),
        (b"null", "must be a JSON object, got NoneType"),
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        pytest.param(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b',"sections":[]}', "nested too deeply", id="deep"),
        (b'{"a":1,"a":2,"sections":[]}', "repeats the key 'a'"),
        (b'{"a":NaN,"sections":[]}', "non-finite number NaN"),
        (b'{"a":-Infinity,"sections":[]}', "non-finite number -Infinity"),
        (b'{"a":1e400,"sections":[]}', "out-of-range number '1e400'"),
        (b'{"a":1.50,"sections":[]}', "not canonical"),
        (b'{"a":"\xc3\xa9","sections":[]}', "not canonical"),  # canonical JSON escapes non-ASCII
        pytest.param(
            b'{"a":1,' + b",".join(b'"k%d":0' % i for i in range(50_000)) + b',"a":2,"sections":[]}',
            "repeats the key 'a'",
            id="late-duplicate-among-many-keys",
        ),
        pytest.param(b'{"a":' + b"9" * 5000 + b',"sections":[]}', "not valid JSON", id="5000-digit-int"),
        (b'{"sections": []}', "not canonical"),
        (b'{"sections":[],"a":1}', "not canonical"),
        (b"{}", "no 'sections' table"),
        (b'{"sections":{}}', "'sections' must be a list"),
    ],
)
def test_malformed_header_json(header_bytes: bytes, match: str) -> None:
    refused(forge(header_bytes=header_bytes), match)


@pytest.mark.parametrize(
    ("table", "payload", "match"),
    [
        ([entry("a", -1, 3, 3)], b"abc", "offset must be a non-negative integer"),
        ([entry("a", 0, -3, -3)], b"", "stored must be a non-negative integer"),
        ([entry("a", 0, 3, 3), entry("b", 1, 2, 2)], b"abcde", "starts at payload offset 1, expected 3"),
        ([entry("a", 0, 2, 2), entry("b", 3, 2, 2)], b"abcde", "starts at payload offset 3, expected 2"),
        ([entry("a", 0, 3, 3)], b"abcdef", "covers 3 payload bytes but the payload has 6"),
        ([entry("a", 0, 3, 3)], b"ab", "covers 3 payload bytes but the payload has 2"),
        ([entry("a", 0, 1, 1), entry("a", 1, 1, 1)], b"ab", "'a' appears twice"),
        ([entry("", 0, 1, 1)], b"a", "non-empty string"),
        ([entry("n" * 129, 0, 1, 1)], b"a", "at most 128"),
        ([{**entry("a", 0, 1, 1), "name": 5}], b"a", "non-empty string"),
        ([{**entry("a", 0, 1, 1), "offset": 0.0}], b"a", "offset must be a non-negative integer"),
        ([{**entry("a", 0, 1, 1), "raw": True}], b"a", "raw must be a non-negative integer"),
        ([{**entry("a", 0, 1, 1), "stored": "1"}], b"a", "stored must be a non-negative integer"),
        ([{**entry("a", 0, 1, 1), "zstd": 0}], b"a", "zstd flag must be true or false"),
        ([{**entry("a", 0, 1, 1), "extra": 1}], b"a", "has keys"),
        ([{"name": "a", "offset": 0, "stored": 1, "raw": 1}], b"a", "has keys"),
        (["a"], b"a", "must be a JSON object, got str"),
        ([entry("a", 0, 3, 5)], b"abc", "uncompressed but stores 3 bytes for 5"),
    ],
)
def test_malformed_section_table(table: list[Any], payload: bytes, match: str) -> None:
    refused(forge({"sections": table}, payload), match)


def test_header_length_limit_and_bounds() -> None:
    blob = forge({"pad": "x" * 200, "sections": []})
    refused(blob, "over the limit of 100", Limits(max_header_bytes=100))
    body = forge({"sections": []}, header_len=10_000)
    refused(body, "runs past the end")


def test_section_count_and_total_size_limits() -> None:
    table = [entry(f"s{i}", i, 1, 1) for i in range(5)]
    blob = forge({"sections": table}, b"abcde")
    refused(blob, "5 sections, over the limit of 4", Limits(max_sections=4))
    refused(blob, "over 4 raw bytes in all", Limits(max_total_raw_bytes=4))
    assert read_blob(blob, Limits(max_sections=5, max_total_raw_bytes=5))[1]["s4"] == b"e"


def test_huge_declared_raw_is_refused_before_any_allocation() -> None:
    frame = with_frame_content_size(zeros_frame(1 << 20), 1 << 30)
    blob = forge({"sections": [entry("big", 0, len(frame), 1 << 30, zstd=True)]}, frame)
    lowered = Limits(max_section_raw_bytes=1 << 20)
    peak = peak_traced_bytes(lambda: refused(blob, "declares 1073741824 raw bytes, over the limit", lowered))
    assert peak < 1 << 20
    # Within the default limits, a 50-byte frame still cannot honestly expand to 1 GiB.
    peak = peak_traced_bytes(lambda: refused(blob, "more than zstd can expand"))
    assert peak < 1 << 20


def test_zstd_bomb_is_cut_at_its_declared_size() -> None:
    frame = with_frame_content_size(zeros_frame(1 << 20), 1000)  # the blocks still hold 1 MiB of zeros
    blob = forge({"sections": [entry("bomb", 0, len(frame), 1000, zstd=True)]}, frame)
    peak = peak_traced_bytes(lambda: refused(blob, "'bomb' does not decompress"))
    assert peak < 256 << 10


def test_frame_size_must_match_the_header() -> None:
    frame = zeros_frame(1 << 20)
    blob = forge({"sections": [entry("s", 0, len(frame), 1000, zstd=True)]}, frame)
    peak = peak_traced_bytes(lambda: refused(blob, "frame declares 1048576 bytes, but the header says 1000"))
    assert peak < 256 << 10


def test_frame_shorter_than_it_declares() -> None:
    frame = with_frame_content_size(zeros_frame(1 << 20), 3 << 19)
    refused(forge({"sections": [entry("s", 0, len(frame), 3 << 19, zstd=True)]}, frame), "does not decompress")


def test_frame_without_content_size_is_refused() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"abc" * 10)
    refused(forge({"sections": [entry("s", 0, len(frame), 30, zstd=True)]}, frame), "frame declares no size")


@pytest.mark.parametrize(
    ("stored", "raw", "match"),
    [
        (b"not a frame at all", 5, "not a zstd frame"),
        (b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"skip", 0, "not a zstd frame"),  # a skippable frame
        (zstandard.compress(b"hello") + b"junk", 5, "does not decompress"),
        (zstandard.compress(b"hel") + zstandard.compress(b"lo"), 3, "does not decompress"),
        (b"\x28\xb5\x2f\xfd\xff", 5, "bad zstd frame header"),
    ],
)
def test_malformed_zstd_sections(stored: bytes, raw: int, match: str) -> None:
    refused(forge({"sections": [entry("s", 0, len(stored), raw, zstd=True)]}, stored), match)


# ---------------------------------------------------------------------------------------------------------------
# Sizes the codec expects from the header


def test_expected_raw_bytes_are_checked_before_decompressing() -> None:
    garbage = b"\x28\xb5\x2f\xfd" + bytes(20)  # would fail to decompress, so reaching zstd would say so
    blob = forge({"shape": [2, 3], "sections": [entry("k", 0, len(garbage), 24, zstd=True)]}, garbage)
    seen: list[dict[str, Any]] = []

    def expect(header: dict[str, Any]) -> dict[str, int]:
        seen.append(header)
        return {"k": 4 * header["shape"][0] * header["shape"][1] + 1}

    with pytest.raises(BitstreamError, match="'k' declares 24 raw bytes, but its header implies 25"):
        read_blob(blob, expect_raw_bytes=expect)
    assert seen == [{"shape": [2, 3]}]


def test_expected_raw_bytes_accepts_a_matching_blob() -> None:
    blob = write_blob({"n": 3}, [("k", b"abc"), ("v", b"defg")])
    expect = {"k": 3, "v": 4}
    assert read_blob(blob, expect_raw_bytes=lambda header: expect)[1] == {"k": b"abc", "v": b"defg"}


@pytest.mark.parametrize(
    ("expected", "match"),
    [
        ({"k": 3}, r"unexpected \['v'\]"),
        ({"k": 3, "v": 4, "w": 0}, r"missing \['w'\]"),
        ({"k": 3, "v": 4.0}, "header implies 4.0"),
        ([3, 4], "not a mapping"),
    ],
)
def test_expected_raw_bytes_must_match_exactly(expected: Any, match: str) -> None:
    blob = write_blob({}, [("k", b"abc"), ("v", b"defg")])
    with pytest.raises(BitstreamError, match=match):
        read_blob(blob, expect_raw_bytes=lambda header: expected)


def test_codec_errors_in_expectation_become_bitstream_errors() -> None:
    blob = write_blob({}, [("k", b"abc")])
    with pytest.raises(BitstreamError, match="rejected by the codec: KeyError") as caught:
        read_blob(blob, expect_raw_bytes=lambda header: {"k": header["shape"]})
    assert isinstance(caught.value.__cause__, KeyError)

    def strict(header: dict[str, Any]) -> dict[str, int]:
        require_int(header, "shape", 0, 10)
        return {}

    with pytest.raises(BitstreamError, match="field 'shape' is missing"):
        read_blob(blob, expect_raw_bytes=strict)


# ---------------------------------------------------------------------------------------------------------------
# Writer refusals


@pytest.mark.parametrize(
    ("header", "sections", "kwargs", "match"),
    [
        ({"sections": 1}, [], {}, "'sections' is reserved"),
        ([("a", 1)], [], {}, "header must be a dict"),
        ({"x": float("nan")}, [], {}, "not JSON-serialisable"),
        ({"x": object()}, [], {}, "not JSON-serialisable"),
        ({1: "a", "b": 2}, [], {}, "not JSON-serialisable"),
        ({}, [("a", b""), ("a", b"")], {}, "'a' appears twice"),
        ({}, [("", b"")], {}, "non-empty string"),
        ({}, [("a", "text")], {}, "must be bytes-like, got str"),
        ({}, [("a", 5)], {}, "must be a contiguous bytes-like"),
        ({}, [("a", b"", "extra")], {}, r"\(name, bytes\) pairs"),
        ({}, [("a", b"")], {"compress": [True, False]}, "1 bools"),
        ({}, [("a", b"")], {"compress": [1]}, "1 bools"),
        ({}, [("a", b"")], {"zstd_level": 23}, "zstd level"),
        ({}, [("a", b"")], {"zstd_level": True}, "zstd level"),
        ({"pad": "x" * (1 << 20)}, [], {}, "header is .* bytes, the limit is"),
    ],
)
def test_writer_refuses_what_it_could_not_read_back(
    header: Any, sections: list[Any], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(BitstreamError, match=match):
        write_blob(header, sections, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Header field validators


def test_require_int() -> None:
    header = {"n": 5, "flag": True, "f": 5.0}
    assert require_int(header, "n", 0, 5) == 5
    with pytest.raises(BitstreamError, match=r"field 'n' must be an integer in \[6, 9\], got 5"):
        require_int(header, "n", 6, 9)
    with pytest.raises(BitstreamError, match="got True"):
        require_int(header, "flag", 0, 1)
    with pytest.raises(BitstreamError, match=r"got 5\.0"):
        require_int(header, "f", 0, 9)
    with pytest.raises(BitstreamError, match=r"^kvcal blob header field 'missing' is missing$"):
        require_int(header, "missing", 0, 1)
    with pytest.raises(BitstreamError, match="must be a JSON object"):
        require_int([1], "n", 0, 1)  # type: ignore[arg-type]


def test_require_str() -> None:
    header = {"mode": "kvtc", "n": 1, "long": "y" * 500}
    assert require_str(header, "mode") == "kvtc"
    assert require_str(header, "mode", choices={"kvtc", "raw"}) == "kvtc"
    with pytest.raises(BitstreamError, match="must be one of 'a', 'b', got 'kvtc'"):
        require_str(header, "mode", choices=("b", "a"))
    with pytest.raises(BitstreamError, match="must be a string, got 1"):
        require_str(header, "n")
    with pytest.raises(BitstreamError) as caught:
        require_str(header, "long", choices=("a",))
    assert len(str(caught.value)) < 200 and "\n" not in str(caught.value)


def test_require_list() -> None:
    header = {"dims": [1, 2, 3], "flags": [1, True], "scales": [1, 0.5], "x": "abc"}
    assert require_list(header, "dims", 1, 3, item_type=int) == [1, 2, 3]
    with pytest.raises(BitstreamError, match="must have 4 to 8 items, got 3"):
        require_list(header, "dims", 4, 8)
    with pytest.raises(BitstreamError, match="item 1 must be int, got True"):
        require_list(header, "flags", item_type=int)
    assert require_list(header, "scales", item_type=float) == [1, 0.5]
    with pytest.raises(BitstreamError, match="must be a list, got 'abc'"):
        require_list(header, "x")


def test_bitstream_error_is_a_kvcal_error() -> None:
    assert issubclass(BitstreamError, KvcalError)
