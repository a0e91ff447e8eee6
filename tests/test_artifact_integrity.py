"""Artifact integrity: a checksum over metadata and tensors, one-file commits that survive kill -9, cleanup of
interrupted writes, umask-respecting modes, a summary file that never affects loading, short mismatch errors."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import kvcal
from kvcal.artifact import ARTIFACT_FILE, CHECKSUM_KEY, SUMMARY_FILE, Artifact
from kvcal.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(calibrated):
    """A small artifact in the current format: the session's tiny calibrated llama."""
    return calibrated("llama") / "kvcal"


@pytest.fixture(scope="module")
def shipped(source):
    return Artifact.load(source)


@pytest.fixture
def saved(shipped, tmp_path):
    out = tmp_path / "art"
    Artifact(dict(shipped.meta), dict(shipped.tensors)).save(out)
    return out


def read_header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def write_header(path: Path, header: dict) -> None:
    """Replace the JSON header, padded with spaces to its old length so the data offsets stay valid."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(data[:8] + new + b" " * (n - len(new)) + data[8 + n :])


def same(a: Artifact, b: Artifact) -> bool:
    return a.meta == b.meta and a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# --- checksum ---------------------------------------------------------------------------------------------------
def test_round_trip_and_checksum_stored(shipped, saved):
    assert same(Artifact.load(saved), shipped)
    _, header = read_header(saved / ARTIFACT_FILE)
    assert len(header["__metadata__"][CHECKSUM_KEY]) == 64


def test_a_flipped_byte_in_any_tensor_is_refused(saved):
    path = saved / ARTIFACT_FILE
    n, header = read_header(path)
    clean = path.read_bytes()
    names = [k for k in header if k != "__metadata__"]
    assert {"pyramid.weights", "k.0.basis", "v.0.mean"} <= set(names)
    for name in names:  # basis, mean, eigenvalues, per-ratio tables, pyramid weights: every one
        start, end = header[name]["data_offsets"]
        if end == start:
            continue
        data = bytearray(clean)
        data[8 + n + (start + end) // 2] ^= 0x10
        path.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match=r"corrupted \(checksum mismatch\); recalibrate") as e:
            Artifact.load(saved)
        assert "\n" not in str(e.value), name


def test_edited_data_offsets_are_refused(saved):
    path = saved / ARTIFACT_FILE
    _, header = read_header(path)
    a, b = header["k.0.mean"]["data_offsets"], header["v.0.mean"]["data_offsets"]
    assert a[1] - a[0] == b[1] - b[0]
    header["k.0.mean"]["data_offsets"], header["v.0.mean"]["data_offsets"] = b, a  # still a valid safetensors file
    write_header(path, header)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        Artifact.load(saved)


def test_edited_metadata_is_refused(saved):
    path = saved / ARTIFACT_FILE
    _, header = read_header(path)
    meta = json.loads(header["__metadata__"]["kvcal"])
    meta["calibration"]["sink"] = 5
    header["__metadata__"]["kvcal"] = json.dumps(meta, sort_keys=True)
    write_header(path, header)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        Artifact.load(saved)


def test_missing_checksum_is_refused(saved):
    path = saved / ARTIFACT_FILE
    _, header = read_header(path)
    del header["__metadata__"][CHECKSUM_KEY]
    write_header(path, header)
    with pytest.raises(ArtifactError, match="no content checksum"):
        Artifact.load(saved)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_file_is_refused(saved, keep):
    path = saved / ARTIFACT_FILE
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ArtifactError) as e:
        Artifact.load(saved)
    assert "\n" not in str(e.value)


def test_summary_file_never_affects_loading(shipped, saved):
    summary = saved / SUMMARY_FILE
    doc = json.loads(summary.read_text())
    assert doc["artifact_sha256"] == read_header(saved / ARTIFACT_FILE)[1]["__metadata__"][CHECKSUM_KEY]
    doc["ratios"] = [1000.0]
    doc["calibration"]["sink"] = 99
    summary.write_text(json.dumps(doc))
    assert same(Artifact.load(saved), shipped)
    summary.write_text("{broken")
    assert same(Artifact.load(saved), shipped)
    summary.unlink()
    assert same(Artifact.load(saved), shipped)


def test_another_models_artifact_is_one_short_line(source, tiny_models):
    from kvcal.models import load_model

    model, _ = load_model(tiny_models["qwen3"], "cpu")
    with pytest.raises(ArtifactError) as e:
        kvcal.load(source, ratio=4, model=model)
    msg = str(e.value)
    assert msg.startswith("artifact was made for another model:") and "\n" not in msg and len(msg) < 200
    assert "attention weights" in msg and "config" in msg and "model type" in msg
    assert "attention_sha256" in e.value.detail  # the long form is kept for --verbose


# --- files on disk ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_modes_follow_the_umask(shipped, tmp_path, mask):
    old = os.umask(mask)
    try:
        Artifact(dict(shipped.meta), dict(shipped.tensors)).save(tmp_path)
    finally:
        os.umask(old)
    for name in (ARTIFACT_FILE, SUMMARY_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def test_stale_temp_files_are_removed_by_the_next_save(shipped, saved):
    stale = [saved / f".{ARTIFACT_FILE}.x1y2.tmp", saved / f".{SUMMARY_FILE}.abcd.tmp"]
    for p in stale:
        p.write_bytes(b"half written")
    (saved / "notes.tmp").write_text("not ours")
    Artifact(dict(shipped.meta), dict(shipped.tensors)).save(saved)
    assert sorted(p.name for p in saved.iterdir()) == sorted([ARTIFACT_FILE, SUMMARY_FILE, "notes.tmp"])


# --- kill -9 in the middle of a save ------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    from kvcal.artifact import Artifact

    src, out, pause_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    art = Artifact.load(src)
    variants = []
    for i in range(2):
        t = dict(art.tensors)
        t["pyramid.weights"] = art.tensors["pyramid.weights"] + (i + 1)
        variants.append(Artifact({**art.meta, "generation": i + 1}, t))
    if pause_at:
        real_fsync, calls = os.fsync, [0]

        def fsync(fd):
            calls[0] += 1
            if calls[0] == pause_at:
                print("paused", flush=True)
                time.sleep(600)
            real_fsync(fd)

        os.fsync = fsync
        print("ready", flush=True)
        variants[0].save(out)
    else:
        print("ready", flush=True)
        i = 0
        while True:
            variants[i % 2].save(out)
            i += 1
""")


def spawn(src: Path, out: Path, pause_at: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), str(pause_at)], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


def expected_variants(shipped: Artifact) -> list[Artifact]:
    out = []
    for i in range(2):
        t = dict(shipped.tensors)
        t["pyramid.weights"] = shipped.tensors["pyramid.weights"] + (i + 1)
        out.append(Artifact({**shipped.meta, "generation": i + 1}, t))
    return out


# The fsyncs of one save: 1 the safetensors temp file, 2 the directory after its rename, 3 the summary temp file,
# 4 the directory after that rename. A kill at 1 must leave the old artifact; at 2-4 the new one.
@pytest.mark.parametrize("pause_at,new", [(1, False), (2, True), (3, True)])
def test_kill_9_inside_save_leaves_old_or_new_and_next_save_cleans_up(source, shipped, saved, pause_at, new):
    child = spawn(source, saved, pause_at)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.stdout.readline().strip() == "paused"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    loaded = Artifact.load(saved)
    assert same(loaded, expected_variants(shipped)[0] if new else shipped)
    if pause_at == 1:
        assert list(saved.glob(f".{ARTIFACT_FILE}.*.tmp"))  # the killed write left its temp file ...
    Artifact(dict(shipped.meta), dict(shipped.tensors)).save(saved)  # ... which the next save removes
    assert sorted(p.name for p in saved.iterdir()) == sorted([ARTIFACT_FILE, SUMMARY_FILE])
    assert same(Artifact.load(saved), shipped)


def test_kill_9_at_random_moments_of_repeated_saves(source, shipped, saved):
    choices = [shipped, *expected_variants(shipped)]
    rng = random.Random(14)
    for _ in range(3):
        child = spawn(source, saved, 0)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.6))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
        loaded = Artifact.load(saved)  # never raises: the file on disk is always a whole artifact
        assert any(same(loaded, c) for c in choices)
    Artifact(dict(shipped.meta), dict(shipped.tensors)).save(saved)
    assert sorted(p.name for p in saved.iterdir()) == sorted([ARTIFACT_FILE, SUMMARY_FILE])
