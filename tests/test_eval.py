"""The evaluation harness: exact baseline, honest byte accounting, controls, ragged caches, report, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import EVAL_CORPUS

from kvcal.adapters import adapter_for
from kvcal.artifact import Artifact
from kvcal.cli import main
from kvcal.errors import ArtifactError, KvcalError, RatioError
from kvcal.eval.harness import (
    EvalReport,
    EvalRow,
    EvalSettings,
    evaluate,
    needle_trials,
    perplexity_windows,
    prefill_with_queries,
)
from kvcal.eval.methods import METHODS, MethodContext, UnknownMethodError, expand_method_names, get_method
from kvcal.eval.methods.eviction import StreamingLLM, snapkv_scores
from kvcal.eval.methods.ragged import is_ragged, ragged_attention
from kvcal.eval.methods.transform import pyramid_union
from kvcal.eval.retrieval import needle_accuracy
from kvcal.eval.scoring import continue_from, evict_middle, prefill

SINK, WINDOW = 4, 32
SETTINGS = EvalSettings(prefix=128, continuation=24, sink=SINK, window=WINDOW, windows=2, needles=2, needle_context=144)
HEAD_DIM = 16  # the tiny fixtures' head size




def context_for(model, artifact=None) -> MethodContext:
    adapter = adapter_for(model)
    return MethodContext(model, adapter, adapter.layout(), SINK, WINDOW, artifact)


def prefilled(model, ctx, n=120, seed=0):
    ids = torch.randint(2, 128, (1, n), generator=torch.Generator().manual_seed(seed))
    return prefill_with_queries(model, ctx, ids, all_queries=True)  # H2O needs every query; SnapKV slices


def test_uncompressed_reproduces_the_models_own_loss(llama, texts):
    model_dir, model, tok = llama
    report = evaluate(model, tok, texts, methods=["uncompressed"], settings=SETTINGS, progress=False)
    nll, count = 0.0, 0
    for ids in perplexity_windows(tok, texts, SETTINGS):
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].float()
        nll += float(F.cross_entropy(logits[SETTINGS.prefix - 1 : -1], ids[SETTINGS.prefix :], reduction="sum"))
        count += SETTINGS.continuation
    assert abs(math.log(report.ppl_uncompressed) - nll / count) < 1e-4
    row = report.rows[0]
    assert row.method == "uncompressed" and row.measured_ratio == 1.0 and row.ppl_delta_pct == 0.0


def test_retrieval_matches_the_needle_probe_and_its_evicted_control(llama, texts):
    _, model, tok = llama
    report = evaluate(model, tok, texts, methods=["int4"], settings=SETTINGS, progress=False)
    trials = needle_trials(tok, texts, SETTINGS)
    assert report.retrieval_full == needle_accuracy(model, trials)
    assert report.retrieval_evicted == needle_accuracy(model, trials, lambda c: evict_middle(c, SINK, WINDOW))


def test_evicted_control_is_streamingllm_without_budget(llama):
    _, model, _ = llama
    ctx = context_for(model)
    pre = prefilled(model, ctx)
    ours = StreamingLLM().apply(pre, ctx, math.inf).cache
    theirs = evict_middle(pre.cache, SINK, WINDOW)
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # A small budget only extends the recent window: the sink and window stay, the oldest middle tokens go.
    out = StreamingLLM().apply(pre, ctx, 64.0)
    kept = round((120 - SINK - WINDOW) / 64)
    assert out.cache.layers[0].keys.shape[2] == SINK + kept + WINDOW
    assert torch.equal(out.cache.layers[0].keys[:, :, SINK:], pre.cache.layers[0].keys[:, :, -(kept + WINDOW):])


def test_methods_leave_the_prefilled_cache_untouched(llama):
    model_dir, model, _ = llama
    ctx = context_for(model, Artifact.load(model_dir))
    pre = prefilled(model, ctx)
    before = [(lay.keys.clone(), lay.values.clone()) for lay in pre.cache.layers]
    feed = torch.randint(2, 128, (1, 8))
    for name in METHODS:
        out = get_method(name).apply(pre, ctx, None if not get_method(name).takes_ratio else 4.0)
        continue_from(model, out.cache, feed, pre.length)
    for (k, v), lay in zip(before, pre.cache.layers):
        assert torch.equal(k, lay.keys) and torch.equal(v, lay.values) and lay.keys.shape[2] == pre.length


@pytest.mark.parametrize("name, bits, meta_bytes", [("int4", 4, 4), ("int8", 8, 4), ("fp8", 8, 2)])
def test_per_token_quantizers_count_codes_and_metadata(llama, name, bits, meta_bytes):
    _, model, _ = llama
    ctx = context_for(model)
    out = get_method(name).apply(prefilled(model, ctx), ctx, None)
    d = HEAD_DIM
    assert out.bf16_bytes / out.stored_bytes == pytest.approx(16 * d / (bits * d + 8 * meta_bytes), rel=1e-12)
    if name == "int4":
        assert out.bf16_bytes / out.stored_bytes == 16 * d / (4 * d + 32)


def test_kivi_counts_per_channel_key_groups_and_its_residual(llama):
    _, model, _ = llama
    ctx = context_for(model)
    pre = prefilled(model, ctx, n=120)
    out = get_method("kivi2").apply(pre, ctx, None)
    m, d, heads, layers = 120 - SINK - WINDOW, HEAD_DIM, 2, 2
    groups, residual = divmod(m, 32)
    keys = groups * (32 * d * 2 // 8 + d * 4) + residual * d * 2  # 2-bit codes + per-channel shift/scale; bf16 rest
    values = m * (d * 2 // 8 + 4)  # one group of min(32, d) channels per token
    assert out.stored_bytes == (keys + values) * heads * layers
    assert out.bf16_bytes == m * heads * 2 * d * 2 * layers


@pytest.mark.parametrize("name", ["streamingllm", "snapkv", "pyramidkv"])
@pytest.mark.parametrize("ratio", [2.0, 8.0])
def test_eviction_keeps_exactly_middle_over_ratio(llama, name, ratio):
    model_dir, model, _ = llama
    artifact = Artifact.load(model_dir)
    ctx = context_for(model, artifact)
    pre = prefilled(model, ctx)
    m = pre.length - SINK - WINDOW
    out = get_method(name).apply(pre, ctx, ratio)
    kept = [out.cache.layers[i].keys.shape[2] - SINK - WINDOW for i in ctx.coded_layers]
    assert sum(kept) == round(m / ratio) * len(kept)
    per_token = 2 * 2 * HEAD_DIM * 2  # heads × (key + value) × bf16
    assert out.stored_bytes == sum(kept) * per_token and out.bf16_bytes == m * per_token * len(kept)
    # Sink and window are untouched.
    for i in ctx.coded_layers:
        assert torch.equal(out.cache.layers[i].keys[:, :, :SINK], pre.cache.layers[i].keys[:, :, :SINK])
        assert torch.equal(out.cache.layers[i].keys[:, :, -WINDOW:], pre.cache.layers[i].keys[:, :, -WINDOW:])


def test_pyramidkv_follows_the_artifacts_weights_through_ragged_attention(llama, texts):
    model_dir, model, tok = llama
    artifact = Artifact.load(model_dir)
    artifact.tensors["pyramid.weights"] = torch.tensor([1.6, 0.4])
    ctx = context_for(model, artifact)
    pre = prefilled(model, ctx)
    out = get_method("pyramidkv").apply(pre, ctx, 4.0)
    lens = [lay.keys.shape[2] - SINK - WINDOW for lay in out.cache.layers]
    assert lens[0] > lens[1] and sum(lens) == 2 * round((pre.length - SINK - WINDOW) / 4)
    assert is_ragged(out.cache, ctx.coded_layers)
    report = evaluate(model, tok, texts, methods=["pyramidkv"], ratios=[4], artifact=artifact, settings=SETTINGS,
                      progress=False)
    assert math.isfinite(report.rows[1].ppl)


def test_ragged_attention_matches_the_model(llama):
    _, model, _ = llama
    ids, feed = torch.randint(2, 128, (1, 60)), torch.randint(2, 128, (1, 6))
    cache = prefill(model, ids)
    from kvcal.eval.methods.base import with_layers

    reference = continue_from(model, with_layers(cache, {}), feed, 60)
    with ragged_attention(model):
        ours = continue_from(model, with_layers(cache, {}), feed, 60)
    assert (ours - reference).abs().max() < 1e-5
    assert model.config._attn_implementation != "kvcal_ragged"
    # Layer 1 without tokens 10..19; one token at a time needs no mask, so it is an independent reference.
    lay = cache.layers[1]
    keep = torch.cat([torch.arange(10), torch.arange(20, 60)])
    ragged = lambda: with_layers(cache, {1: (lay.keys[:, :, keep], lay.values[:, :, keep])})  # noqa: E731
    with ragged_attention(model):
        together = continue_from(model, ragged(), feed, 60)
    step_cache = ragged()
    steps = torch.cat([continue_from(model, step_cache, feed[:, i : i + 1], 60 + i) for i in range(6)], dim=1)
    assert (together - steps).abs().max() < 1e-5


def test_transform_methods_account_their_bytes(llama):
    model_dir, model, _ = llama
    artifact = Artifact.load(model_dir)
    ctx = context_for(model, artifact)
    pre = prefilled(model, ctx)
    m = pre.length - SINK - WINDOW
    pca = get_method("pca")
    out = pca.apply(pre, ctx, 4.0)
    ranks = sum(pca.kept_rank(ctx, kind, 0, 4.0) for kind in ("k", "v"))
    assert out.stored_bytes == m * ranks * 2
    kvtc = get_method("kvtc").apply(pre, ctx, 4.0)
    stats = ctx.codec(4.0).stats(ctx.codec(4.0).compress(pre.cache))
    assert (kvtc.stored_bytes, kvtc.bf16_bytes) == (stats["middle_bytes"], stats["middle_bf16_bytes"])
    # kvtc+pyramidkv at 8: codec at 4 on half the middle, plus a bitmap of kept positions.
    combo = get_method("kvtc+pyramidkv")
    assert combo.plan(ctx, 8.0) == (4.0, 0.5)
    out = combo.apply(pre, ctx, 8.0)
    assert out.cache.layers[0].keys.shape[2] == SINK + round(m / 2) + WINDOW
    assert out.bf16_bytes == kvtc.bf16_bytes
    # The codec at 4 measures 3-4x on this tiny random model (see test_codec), plus the bitmap.
    assert 4.5 < out.bf16_bytes / out.stored_bytes < 10.0


def test_kvtc_pyramidkv_puts_kept_tokens_back_at_their_positions(llama):
    model_dir, model, _ = llama
    ctx = context_for(model, Artifact.load(model_dir))
    pre = prefilled(model, ctx)
    out = get_method("kvtc+pyramidkv").apply(pre, ctx, 4.0)  # codec at 2 on half the middle
    lo, hi = SINK, pre.length - WINDOW
    weights = ctx.artifact.budget_weights()
    idx = pyramid_union({layer: snapkv_scores(pre, ctx, layer).sum(1) for layer in ctx.coded_layers},
                        {layer: float(weights[layer]) for layer in ctx.coded_layers}, round((hi - lo) / 2))[0]
    packed = torch.arange(lo, lo + idx.numel())[None]
    for layer in ctx.coded_layers:
        original = pre.cache.layers[layer].keys[:, :, lo:hi][:, :, idx]
        restored = out.cache.layers[layer].keys[:, :, lo:-WINDOW]
        misplaced = ctx.adapter.rotate_keys(ctx.adapter.unrotate_keys(restored, layer, idx[None] + lo), layer, packed)
        assert rel_error(restored, original) < 0.1 < 0.3 < rel_error(misplaced, original)
        values = pre.cache.layers[layer].values[:, :, lo:hi][:, :, idx]
        assert rel_error(out.cache.layers[layer].values[:, :, lo:-WINDOW], values) < 0.1


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_plan_checks_before_running(llama, texts):
    model_dir, model, tok = llama
    with pytest.raises(UnknownMethodError, match="known methods: uncompressed"):
        get_method("nope")
    with pytest.raises(RatioError, match="not in this artifact"):
        evaluate(model, tok, texts, methods=["kvtc"], ratios=[3], artifact=Artifact.load(model_dir), settings=SETTINGS)
    with pytest.raises(ArtifactError, match="calibrate"):
        evaluate(model, tok, texts, methods=None, artifact=None, settings=SETTINGS)
    with pytest.raises(KvcalError, match="no middle"):
        evaluate(model, tok, texts, methods=["int4"], settings=EvalSettings(prefix=30, window=32))


def test_report_headline_table_json_and_plot(tmp_path):
    def row(method, ratio, delta, acc):
        return EvalRow(method, ratio, ratio, 10 * (1 + delta / 100), delta, acc, 100, int(100 * ratio), 0.1)

    rows = [row("uncompressed", 1.0, 0.0, 0.9), row("kvtc", 8.0, 0.5, 0.9), row("kvtc", 16.0, 0.9, 0.895),
            row("kvtc", 32.0, 3.0, 0.9), row("kvtc", 64.0, 0.2, 0.5), row("snapkv", 8.0, 4.0, 0.2)]
    report = EvalReport("m", None, SETTINGS, 10.0, 14.0, 0.9, 0.1, rows)
    assert report.headline() == {"uncompressed": 1.0, "kvtc": 16.0, "snapkv": None}
    doc = report.to_json()
    assert doc["headline"]["best_ratio_by_method"]["kvtc"] == 16.0
    assert json.loads(json.dumps(doc))["controls"]["retrieval_middle_evicted"] == 0.1
    assert "kvtc" in report.table() and "16.00x" in report.table()
    assert report.controls_discriminate() == {"ppl": True, "retrieval": True} and "warning" not in report.table()
    blind = EvalReport("m", None, SETTINGS, 10.0, 10.05, 0.9, 0.895, rows)
    assert blind.controls_discriminate() == {"ppl": False, "retrieval": False}
    assert "cannot tell" in blind.table()
    path = report.plot(tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_window_figures_add_up_and_survive_json(llama, texts):
    _, model, tok = llama
    report = evaluate(model, tok, texts, methods=["streamingllm"], ratios=[4], settings=SETTINGS, progress=False)
    for row in report.rows:
        assert len(row.window_nll) == SETTINGS.windows and len(row.trial_hits) == SETTINGS.needles
        assert math.exp(sum(row.window_nll) / (SETTINGS.windows * SETTINGS.continuation)) == pytest.approx(row.ppl, rel=1e-5)
        assert sum(row.trial_hits) / (SETTINGS.needles * 24) == pytest.approx(row.retrieval)
    again = EvalReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again.rows == report.rows and again.settings == report.settings
    assert again.headline() == report.headline() and again.ppl_evicted == report.ppl_evicted


def test_method_families_expand_in_order():
    assert expand_method_names(["h2o", "turboquant", "turboquant-3.5"]) == [
        "h2o", "turboquant-2.5", "turboquant-3.5", "turboquant-prod-2.5", "turboquant-prod-3.5"]
    with pytest.raises(UnknownMethodError, match="turboquant"):
        expand_method_names(["turbo"])


def test_cli_eval_runs_and_writes(llama, tmp_path):
    model_dir, _, _ = llama
    args = ["eval", str(model_dir), "--data", str(EVAL_CORPUS), "--prefix", "128", "--continuation", "16", "--window",
            str(WINDOW), "--windows", "1", "--needles", "1", "--needle-context", "144", "--method", "int4", "--method",
            "kvtc", "--ratio", "4", "--device", "cpu", "--no-progress", "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "r.png")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["method"] for r in doc["rows"]] == ["uncompressed", "int4", "kvtc"]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_unknown_method_is_one_line(llama):
    model_dir, _, _ = llama
    res = CliRunner().invoke(main, ["eval", str(model_dir), "--method", "nope"])
    assert res.exit_code != 0
    assert res.output.count("\n") == 1 and "known methods" in res.output and "Traceback" not in res.output
