"""LMCache's ``kvtc`` serde (kvcal.integrations.lmcache), through LMCache's own factory and async wrapper.

Needs the optional extra (``pip install -e ".[lmcache,dev]"``, best in its own venv: LMCache pins numpy<=2.2.6 and
transformers>=5.4); without it every test here but the first is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "artifacts" / "kvcal-ref-llama"
QWEN3 = ROOT / "artifacts" / "kvcal-ref-qwen3"
# The reference Llama's artifact (its model directory); another one calibrated on that model can stand in.
ART_LLAMA = Path(os.environ.get("KVCAL_TEST_LMCACHE_ARTIFACT", LLAMA))
SKIP_REASON = "the kvtc serde needs LMCache 0.5.6: pip install -e '.[lmcache]' (in its own venv)"


def test_kvcal_imports_without_lmcache_and_declares_the_extra():
    code = ("import sys, kvcal, kvcal.integrations, kvcal.integrations.post_rope; "
            "assert 'lmcache' not in sys.modules, 'importing kvcal pulled in lmcache'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["lmcache"] == ["lmcache==0.5.6"]
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith("lmcache") for d in base)


@pytest.fixture(scope="module")
def lmc():
    pytest.importorskip("lmcache.v1.distributed.serde", reason=SKIP_REASON)
    import kvcal.integrations.lmcache as lmc

    return lmc


@pytest.fixture(scope="module")
def cache_llama():
    """The reference Llama's cache of 1024 evaluation tokens (post-RoPE keys, as an engine caches them)."""
    from kvcal.data import bundled_corpus, load_texts, token_stream
    from kvcal.models import load_model

    model, tok = load_model(LLAMA, device="cpu")
    ids = token_stream(tok, load_texts([bundled_corpus("eval")]))[None, 3000:4024]
    with torch.no_grad():
        return model(ids, use_cache=True).past_key_values


def chunk(cache, a: int, b: int, dtype=torch.bfloat16) -> torch.Tensor:
    """LMCache's layout of tokens ``[a, b)``: ``[2, layers, tokens, kv_heads * head_dim]``."""
    return torch.stack([torch.stack([(lay.keys if kv == 0 else lay.values)[0, :, a:b].permute(1, 0, 2).reshape(b - a, -1)
                                     for lay in cache.layers]) for kv in (0, 1)]).to(dtype)


def memory_obj(t: torch.Tensor, positions: torch.Tensor | None = None):
    from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj

    t = t.contiguous()
    meta = MemoryObjMetadata(shape=t.shape, dtype=t.dtype, address=0, phy_size=t.numel() * t.element_size(),
                             ref_count=1, shapes=[t.shape], dtypes=[t.dtype], cached_positions=positions)
    return TensorMemoryObj(t.view(-1).view(torch.uint8).clone(), meta, None)


def object_key(i: int = 0):
    from lmcache.v1.distributed.api import ObjectKey

    return ObjectKey(chunk_hash=f"chunk-{i}".encode(), model_name="kvcal-ref-llama", kv_rank=0)


def processor(settings: dict):
    from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor

    return create_serde_processor(SerdeConfig("kvtc", settings))


def wait(query, task) -> bool:
    deadline = time.time() + 120
    while time.time() < deadline:
        done = query(task)
        if done is not None:
            return done
        time.sleep(1e-3)
    raise TimeoutError("serde task did not finish")


def round_trip(proc, chunks: list[torch.Tensor], positions=None) -> tuple[list[torch.Tensor], list[bytes]]:
    """Serialize then deserialize ``chunks`` as one task each way through the async processor."""
    from lmcache.v1.distributed.api import MemoryLayoutDesc

    srcs = [memory_obj(t, None if positions is None else positions[i]) for i, t in enumerate(chunks)]
    dsts = [memory_obj(torch.zeros(proc.estimate_serialized_size(MemoryLayoutDesc([t.shape], [t.dtype])), dtype=torch.uint8))
            for t in chunks]
    keys = [object_key(i) for i in range(len(chunks))]
    assert wait(proc.query_serialize_result, proc.submit_serialize(srcs, dsts, keys))
    stored = [bytes(d.byte_array) for d in dsts]  # narrowed by the wrapper to the bytes written
    outs = [memory_obj(torch.zeros_like(t)) for t in chunks]
    loaded = [memory_obj(torch.frombuffer(bytearray(s), dtype=torch.uint8)) for s in stored]
    assert wait(proc.query_deserialize_result, proc.submit_deserialize(loaded, outs, keys))
    return [o.tensor.clone() for o in outs], stored


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_registered_with_lmcache(lmc):
    from lmcache.v1.distributed.serde import get_registered_serde_types

    assert "kvtc" in get_registered_serde_types()
    lmc.register()  # idempotent: a second import or call does not trip LMCache's duplicate check


def test_round_trip_through_lmcache_factory_matches_the_codec(lmc, cache_llama):
    proc = processor({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 16})
    try:
        t = chunk(cache_llama, 256, 512)
        (out,), (data,) = round_trip(proc, [t])
        # The serde found the chunk's true offset and its output is exactly the codec's at that offset.
        header, blob = lmc.parse_chunk(data)
        assert header["positions"] == "estimate" and header["frame"] == "pre-rope"
        codec = proc._serializer.codec
        geo, _ = codec.parse(bytes(blob))
        assert geo.offsets == (256,)
        kv = lmc.chunk_view(t, codec)
        ref = codec.decompress(codec.compress(kv, position_offsets=[256]))
        for layer, lay in enumerate(ref.layers):
            assert torch.equal(out[0, layer], lay.keys[0].permute(1, 0, 2).reshape(256, -1).to(out.dtype))
            assert torch.equal(out[1, layer], lay.values[0].permute(1, 0, 2).reshape(256, -1).to(out.dtype))
        # Within the ratio's expected error, and about that much smaller.
        assert rel_err(out[0], t[0]) < 0.1 and rel_err(out[1], t[1]) < 0.15
        assert t.numel() * 2 / len(data) > 12
    finally:
        proc.close()


def test_offsets_estimated_or_taken_from_metadata(lmc, cache_llama):
    proc = processor({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 32})
    try:
        spans = [(0, 256), (256, 512), (512, 768), (768, 1024)]
        chunks = [chunk(cache_llama, a, b) for a, b in spans]
        _, stored = round_trip(proc, chunks)
        codec = proc._serializer.codec
        assert [codec.parse(bytes(lmc.parse_chunk(s)[1]))[0].offsets[0] for s in stored] == [a for a, _ in spans]
        # LMCache's own position field, when filled, is used as is.
        _, stored = round_trip(proc, chunks[1:2], positions=[torch.arange(256, 512)])
        header, blob = lmc.parse_chunk(stored[0])
        assert header["positions"] == "metadata" and codec.parse(bytes(blob))[0].offsets == (256,)
    finally:
        proc.close()


def test_chunks_larger_than_one_codec_call(lmc, cache_llama):
    """A whole request in one task (one codec call per chunk, concatenated), a 1024-token chunk, and a chunk longer
    than the configured chunk size (refused: its offset could not be a multiple of it)."""
    proc = processor({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 32})
    big = processor({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 32, "chunk_size": 1024})
    try:
        whole = chunk(cache_llama, 0, 1024)
        parts = [whole[:, :, a : a + 256] for a in range(0, 1024, 256)]
        outs, _ = round_trip(proc, parts)
        one, (data,) = round_trip(big, [whole])
        assert rel_err(torch.cat(outs, dim=2)[0], whole[0]) < 0.15 and rel_err(one[0][0], whole[0]) < 0.15
        assert lmc.parse_chunk(data)[0]["tokens"] == 1024
        with pytest.raises(lmc.ChunkLayoutError, match="more than the serde's chunk_size 256"):
            proc._serializer.encode(whole)
    finally:
        proc.close()
        big.close()


def test_other_artifact_model_or_ratio_is_refused(lmc, cache_llama):
    from kvcal.errors import BitstreamError

    llama = lmc.KvtcSerdeConfig.from_kwargs({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 32})
    codec = llama.build_codec()
    data = lmc.KvtcSerializer(codec, llama).encode(chunk(cache_llama, 0, 256))
    for settings, message in (({"artifact": str(QWEN3)}, "qwen3"),
                              ({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 16}, "ratio 32")):
        cfg = lmc.KvtcSerdeConfig.from_kwargs(settings)
        with pytest.raises(BitstreamError, match=message) as err:
            lmc.KvtcDeserializer(cfg.build_codec(), cfg).decode(data, (2, 6, 256, 128))
        assert "\n" not in str(err.value)
    with pytest.raises(BitstreamError, match="destination is"):
        lmc.KvtcDeserializer(codec, llama).decode(data, (2, 6, 128, 128))
    # A chunk of another shape than the artifact's model, at serialize time.
    with pytest.raises(lmc.ChunkLayoutError, match="does not match the artifact's model"):
        lmc.KvtcSerializer(codec, llama).encode(torch.zeros(2, 4, 16, 128))


def test_corrupted_or_foreign_bytes_are_refused_and_never_written(lmc, cache_llama):
    from kvcal.errors import BitstreamError

    cfg = lmc.KvtcSerdeConfig.from_kwargs({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 32})
    codec = cfg.build_codec()
    t = chunk(cache_llama, 512, 768)
    data = lmc.KvtcSerializer(codec, cfg).encode(t)
    deser = lmc.KvtcDeserializer(codec, cfg)
    gen = torch.Generator().manual_seed(0)
    for pos in [0, 5, 12, 20, len(data) // 2, len(data) - 1, *torch.randint(0, len(data), (20,), generator=gen).tolist()]:
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(BitstreamError) as err:
            deser.decode(bytes(bad), tuple(t.shape))
        assert "\n" not in str(err.value)
    with pytest.raises(BitstreamError, match="truncated"):
        deser.decode(data[: len(data) // 2], tuple(t.shape))
    with pytest.raises(BitstreamError, match="bad magic"):
        deser.decode(t.to(torch.float8_e4m3fn).view(torch.uint8).flatten().numpy().tobytes(), tuple(t.shape))
    # Through LMCache's wrapper: the task fails and the destination keeps what it held.
    proc = processor({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 32})
    try:
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 1
        dst = memory_obj(torch.full_like(t, 7.0))
        src = memory_obj(torch.frombuffer(bad, dtype=torch.uint8))
        assert wait(proc.query_deserialize_result, proc.submit_deserialize([src], [dst], [object_key()])) is False
        assert bool((dst.tensor == 7.0).all())
    finally:
        proc.close()


def test_async_wrapper_runs_concurrent_tasks(lmc, cache_llama):
    proc = processor({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 48, "max_workers": 2})
    try:
        from lmcache.v1.distributed.api import MemoryLayoutDesc

        chunks = [chunk(cache_llama, a, a + 256) for a in (0, 256, 512, 768)]
        srcs = [memory_obj(t) for t in chunks]
        size = proc.estimate_serialized_size(MemoryLayoutDesc([chunks[0].shape], [chunks[0].dtype]))
        dsts = [memory_obj(torch.zeros(size, dtype=torch.uint8)) for _ in chunks]
        tasks = [proc.submit_serialize([s], [d], [object_key(i)]) for i, (s, d) in enumerate(zip(srcs, dsts))]
        assert all(wait(proc.query_serialize_result, task) for task in tasks)
        assert len({proc.get_serialize_event_fd(), proc.get_deserialize_event_fd()}) == 2
        sync = lmc.KvtcSerializer(proc._serializer.codec, proc._serializer.config)
        for t, d in zip(chunks, dsts):
            assert bytes(d.byte_array) == sync.encode(t)  # narrowed to what was written, same bytes as a sync call
            assert d.get_size() < size / 20
    finally:
        proc.close()


def test_settings_errors_are_one_line(lmc):
    from kvcal.errors import ArtifactError, KvcalError, RatioError

    for settings, error, message in (
        ({}, lmc.SerdeConfigError, "needs \"artifact\""),
        ({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 32, "colour": "red"}, lmc.SerdeConfigError, "unknown setting"),
        ({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": "fast"}, lmc.SerdeConfigError, "ratio must be a number"),
        ({"artifact": str(ART_LLAMA), "model": str(LLAMA), "chunk_size": 0}, lmc.SerdeConfigError, "chunk_size must be an integer >= 1"),
        ({"artifact": str(ART_LLAMA), "model": str(LLAMA), "positions": "guess"}, lmc.SerdeConfigError, "positions must be"),
        ({"artifact": str(ART_LLAMA), "model": str(LLAMA), "ratio": 33}, RatioError, "not in this artifact"),
        ({"artifact": "/nonexistent/model"}, ArtifactError, "no kvcal artifact"),
    ):
        with pytest.raises(error, match=message) as err:
            processor(settings)
        assert isinstance(err.value, KvcalError) and "\n" not in str(err.value)


def test_post_rope_artifact_codes_without_positions(lmc, tiny_models, tmp_path):
    from kvcal.artifact import Artifact
    from kvcal.errors import BitstreamError
    from kvcal.integrations.post_rope import calibrate_post_rope, key_frame
    from kvcal.models import load_model

    model_dir = tiny_models["llama"]
    out = tmp_path / "post"
    art = calibrate_post_rope(model_dir, out, data=[ROOT / "artifacts" / "corpus" / "eval.jsonl"], seq_len=256,
                              max_tokens=256 * 12, ratios=(2, 4), window=32, heldout_tokens=1024, heldout_every=2,
                              progress=False)
    assert key_frame(art) == "post-rope" and key_frame(Artifact.load(out)) == "post-rope"
    model, _ = load_model(model_dir, device="cpu")
    with torch.no_grad():
        cache = model(torch.randint(0, 128, (1, 64)), use_cache=True).past_key_values
    t = chunk(cache, 16, 48, torch.float32)
    post = lmc.KvtcSerdeConfig.from_kwargs({"artifact": str(out), "model": str(model_dir), "ratio": 2, "chunk_size": 32})
    codec = post.build_codec()
    data = lmc.KvtcSerializer(codec, post).encode(t)
    header, _ = lmc.parse_chunk(data)
    assert header["frame"] == "post-rope" and header["positions"] == "none"
    out_t = lmc.KvtcDeserializer(codec, post).decode(data, tuple(t.shape))
    assert rel_err(out_t, t) < 0.1
    # A pre-RoPE serde refuses the post-RoPE chunk.
    import kvcal

    kvcal.calibrate(model_dir, data=[ROOT / "artifacts" / "corpus" / "eval.jsonl"], out=tmp_path / "pre", seq_len=256,
                    max_tokens=256 * 12, ratios=(2, 4), window=32, heldout_tokens=1024, heldout_every=2, progress=False)
    pre = lmc.KvtcSerdeConfig.from_kwargs({"artifact": str(tmp_path / "pre"), "model": str(model_dir), "ratio": 2})
    with pytest.raises(BitstreamError, match="post-rope key frame"):
        lmc.KvtcDeserializer(pre.build_codec(), pre).decode(data, tuple(t.shape))


def test_turboquant_port_matches_lmcache_triton_kernels_interpreted(lmc):
    pytest.importorskip("triton", reason="the port check runs LMCache's Triton kernels under TRITON_INTERPRET=1")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_vs_lmcache.py"), "--check-port"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])["presets"]
    for preset, row in report.items():
        assert row["dequant_identical"], preset
        assert row["store_value_bytes_differing"] == 0, preset
        if preset != "turboquant_k8v4":
            assert row["store_key_bytes_differing"] == 0, preset
        else:
            # FP8 keys: the port rounds to nearest even like the GPU's cvt.rn; the interpreter does not (see the bench).
            assert row.get("port_key_bytes_equal_rne", True)


def test_turboquant_port_runs_lmcache_serializer_on_cpu(lmc, cache_llama):
    from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor

    from kvcal.integrations.lmcache_turboquant_port import patched_turboquant

    proc = create_serde_processor(SerdeConfig("turboquant", {"preset": "turboquant_k3v4_nc", "head_dim": 64,
                                                             "skip_first_layers": 0, "skip_last_layers": 0}))
    try:
        with patched_turboquant():
            (out,), (data,) = round_trip(proc, [chunk(cache_llama, 0, 256)])
        t = chunk(cache_llama, 0, 256)
        assert len(data) == 6 * 256 * 2 * 62  # layers x tokens x kv heads x (key 24 + 2, value 32 + 4 bytes)
        assert rel_err(out[1], t[1]) < 0.2 and rel_err(out[0], t[0]) < 0.2
    finally:
        proc.close()


def test_bench_script_loads_without_lmcache():
    spec = importlib.util.spec_from_file_location("bench_vs_lmcache", ROOT / "scripts" / "bench_vs_lmcache.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    assert module.parse_args([]).windows == 64 and module.parse_args([]).needles == 128
