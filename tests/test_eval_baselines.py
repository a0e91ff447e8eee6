"""The H2O and TurboQuant baselines: equal-memory selection, exact byte accounting, harness and CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import EVAL_CORPUS

from kvcal.adapters import adapter_for
from kvcal.cli import main
from kvcal.errors import KvcalError
from kvcal.eval.harness import EvalSettings, evaluate, prefill_with_queries
from kvcal.eval.methods import METHODS, MethodContext, get_method
from kvcal.eval.methods.eviction import accumulated_attention
from kvcal.eval.methods.turboquant import (
    bit_split,
    lloyd_max_codebook,
    rotation,
    turboquant_prod_rows,
    turboquant_rows,
)

SINK, WINDOW = 4, 32
SETTINGS = EvalSettings(prefix=128, continuation=16, sink=SINK, window=WINDOW, windows=1, needles=1, needle_context=144)
HEAD_DIM = 16  # the tiny fixtures' head size
HEADS, LAYERS = 2, 2  # KV heads and full-attention layers of the tiny llama




def context_for(model) -> MethodContext:
    adapter = adapter_for(model)
    return MethodContext(model, adapter, adapter.layout(), SINK, WINDOW)


def prefilled(model, ctx, n=120, seed=0, all_queries=True):
    ids = torch.randint(2, 128, (1, n), generator=torch.Generator().manual_seed(seed))
    return prefill_with_queries(model, ctx, ids, all_queries=all_queries)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_registered_with_their_kinds():
    assert {"h2o", "turboquant-2.5", "turboquant-3.5", "turboquant-prod-2.5", "turboquant-prod-3.5"} <= set(METHODS)
    assert get_method("h2o").takes_ratio and get_method("h2o").needs_all_queries
    assert not get_method("turboquant-3.5").takes_ratio and get_method("turboquant-2.5").bits == 2.5


@pytest.mark.parametrize("ratio", [2.0, 8.0])
def test_h2o_keeps_the_equal_memory_count_and_bills_like_streamingllm(llama, ratio):
    _, model, _ = llama
    ctx = context_for(model)
    pre = prefilled(model, ctx)
    m = pre.length - SINK - WINDOW
    out = get_method("h2o").apply(pre, ctx, ratio)
    ref = get_method("streamingllm").apply(pre, ctx, ratio)
    for i in ctx.coded_layers:
        assert out.cache.layers[i].keys.shape[2] == SINK + round(m / ratio) + WINDOW
        assert torch.equal(out.cache.layers[i].keys[:, :, :SINK], pre.cache.layers[i].keys[:, :, :SINK])
        assert torch.equal(out.cache.layers[i].values[:, :, -WINDOW:], pre.cache.layers[i].values[:, :, -WINDOW:])
    assert (out.stored_bytes, out.bf16_bytes) == (ref.stored_bytes, ref.bf16_bytes)
    assert out.stored_bytes == round(m / ratio) * HEADS * 2 * HEAD_DIM * 2 * LAYERS


def test_h2o_needs_all_prefill_queries(llama):
    _, model, _ = llama
    ctx = context_for(model)
    with pytest.raises(KvcalError, match="all_queries"):
        get_method("h2o").apply(prefilled(model, ctx, all_queries=False), ctx, 4.0)


def test_h2o_selects_the_heaviest_hitters_of_eager_attention(llama):
    _, model, _ = llama
    ctx = context_for(model)
    n = 80
    ids = torch.randint(2, 128, (1, n), generator=torch.Generator().manual_seed(3))
    pre = prefill_with_queries(model, ctx, ids, all_queries=True)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(before)
    lo, hi = SINK, n - WINDOW
    ratio = 4.0
    out = get_method("h2o").apply(pre, ctx, ratio)
    count = round((hi - lo) / ratio)
    for layer in ctx.coded_layers:
        a = attentions[layer].float()  # [1, query heads, n, n]
        direct = a.sum(2).view(1, HEADS, -1, n).sum(2)[..., lo:hi]  # summed over queries, then over each group
        # Chunking the queries changes nothing.
        ours = accumulated_attention(pre, ctx, layer, chunk=7)
        assert torch.allclose(ours, direct, rtol=1e-4, atol=1e-4)
        expect = direct.topk(count, dim=-1).indices.sort(-1).values
        assert torch.equal(out.cache.layers[layer].keys[:, :, SINK:-WINDOW],
                           pre.cache.layers[layer].keys[:, :, lo:hi].gather(
                               2, expect.unsqueeze(-1).expand(-1, -1, -1, HEAD_DIM)))


def test_rotation_is_orthogonal_and_deterministic():
    r = rotation(HEAD_DIM)
    assert torch.allclose(r @ r.T, torch.eye(HEAD_DIM), atol=1e-6)
    assert torch.equal(r, rotation.__wrapped__(HEAD_DIM))  # recomputed from the seed, not only cached
    assert not torch.allclose(r, torch.eye(HEAD_DIM))
    assert not torch.allclose(rotation.__wrapped__(HEAD_DIM, 1), r)


def test_codebook_is_lloyd_max_for_the_sphere_coordinate():
    # In high dimension a coordinate is ~N(0, 1/d): the codebook tends to the Gaussian Lloyd-Max one.
    d = 4096
    assert torch.allclose(lloyd_max_codebook(d, 1) * math.sqrt(d), torch.tensor([-0.7979, 0.7979]), atol=2e-3)
    assert torch.allclose(lloyd_max_codebook(d, 2) * math.sqrt(d), torch.tensor([-1.510, -0.4528, 0.4528, 1.510]),
                          atol=3e-3)
    book = lloyd_max_codebook(HEAD_DIM, 3)
    assert book.numel() == 8 and torch.all(book[1:] > book[:-1]) and torch.equal(book, -book.flip(0))
    assert torch.equal(book, lloyd_max_codebook.__wrapped__(HEAD_DIM, 3))


# Bytes per token and KV head: keys, values. MSE: codes + an fp16 norm; prod keys: codes at one bit less,
# QJL sign bits, fp16 norm and fp16 residual norm.
@pytest.mark.parametrize("name, key_bytes, value_bytes", [
    ("turboquant-2.5", HEAD_DIM * 2.5 / 8 + 2, HEAD_DIM * 2.5 / 8 + 2),
    ("turboquant-3.5", HEAD_DIM * 3.5 / 8 + 2, HEAD_DIM * 3.5 / 8 + 2),
    ("turboquant-prod-2.5", HEAD_DIM * 1.5 / 8 + HEAD_DIM / 8 + 4, HEAD_DIM * 2.5 / 8 + 2),
    ("turboquant-prod-3.5", HEAD_DIM * 2.5 / 8 + HEAD_DIM / 8 + 4, HEAD_DIM * 3.5 / 8 + 2),
])
def test_turboquant_counts_every_byte(llama, name, key_bytes, value_bytes):
    _, model, _ = llama
    ctx = context_for(model)
    pre = prefilled(model, ctx)
    m = pre.length - SINK - WINDOW
    out = get_method(name).apply(pre, ctx, None)
    assert out.stored_bytes == m * HEADS * LAYERS * (key_bytes + value_bytes)
    assert out.bf16_bytes / out.stored_bytes == pytest.approx(2 * HEAD_DIM * 2 / (key_bytes + value_bytes), rel=1e-12)


def test_turboquant_code_bytes_and_bit_split():
    # 3-bit codes are counted as ceil(3 n / 8) bytes.
    assert turboquant_rows(torch.randn(3, 16), 3.0).stored_bytes == 3 * 2 + math.ceil(3 * 16 * 3 / 8)
    assert bit_split(16, 2.5) == (8, 3, 2) and bit_split(16, 3.5) == (8, 4, 3)


def test_turboquant_error_falls_with_bits(llama):
    _, model, _ = llama
    ctx = context_for(model)
    pre = prefilled(model, ctx)
    outs = {b: get_method(f"turboquant-{b}").apply(pre, ctx, None) for b in ("2.5", "3.5")}
    for layer in ctx.coded_layers:
        for kind in ("keys", "values"):
            ref = getattr(pre.cache.layers[layer], kind)[:, :, SINK:-WINDOW]
            errs = {b: rel_error(getattr(o.cache.layers[layer], kind)[:, :, SINK:-WINDOW], ref) for b, o in outs.items()}
            assert errs["3.5"] < errs["2.5"] < 0.4
            exact = getattr(pre.cache.layers[layer], kind)
            assert torch.equal(getattr(outs["2.5"].cache.layers[layer], kind)[:, :, -WINDOW:], exact[:, :, -WINDOW:])
    # On Gaussian rows the MSE is near the paper's (about 0.117 at 2 bits, 0.03 at 3, 0.009 at 4).
    x = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
    mse = {b: float(((turboquant_rows(x, b).values - x) ** 2).sum(-1).mean() / (x**2).sum(-1).mean()) for b in (2.5, 3.5)}
    assert 0.05 < mse[2.5] < 0.09 and 0.012 < mse[3.5] < 0.025


def test_turboquant_prod_inner_products_are_unbiased():
    # The MSE quantizer shrinks inner products by about (1 - distortion); the QJL residual removes that bias.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 64, generator=g)
    y = torch.randn(4000, 64, generator=g) + 0.5 * x  # queries correlated with the keys, as in attention
    true = (x * y).sum(-1)
    prod = (turboquant_prod_rows(x, 2.5).values * y).sum(-1)
    mse = (turboquant_rows(x, 1.5).values * y).sum(-1)  # the same codes without the residual
    assert abs(float(prod.sum() / true.sum()) - 1) < 0.02
    assert float(mse.sum() / true.sum()) < 0.9
    with pytest.raises(KvcalError, match="at least 2 bits"):
        turboquant_prod_rows(x, 1.5)


def test_both_run_through_evaluate(llama, texts):
    _, model, tok = llama
    report = evaluate(model, tok, texts, methods=["h2o", "turboquant-3.5"], ratios=[4], settings=SETTINGS,
                      progress=False)
    rows = {r.method: r for r in report.rows}
    assert set(rows) == {"uncompressed", "h2o", "turboquant-3.5"}
    assert rows["h2o"].target_ratio == 4 and rows["h2o"].measured_ratio == pytest.approx(4.0, rel=0.05)
    assert rows["turboquant-3.5"].measured_ratio == pytest.approx(16 * 16 / (3.5 * 16 + 16))
    assert all(math.isfinite(r.ppl) and r.retrieval is not None for r in report.rows)


def test_cli_eval_runs_both(llama, tmp_path):
    model_dir, _, _ = llama
    args = ["eval", str(model_dir), "--data", str(EVAL_CORPUS), "--prefix", "128", "--continuation", "16", "--window",
            str(WINDOW), "--windows", "1", "--needles", "1", "--needle-context", "144", "--method", "h2o", "--method",
            "turboquant", "--ratio", "4", "--device", "cpu", "--no-progress", "--json", str(tmp_path / "r.json")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "r.json").read_text())
    # `turboquant` names the family: the paper's bit widths, without and with the QJL residual.
    assert [r["method"] for r in doc["rows"]] == ["uncompressed", "h2o", "turboquant-2.5", "turboquant-3.5",
                                                  "turboquant-prod-2.5", "turboquant-prod-3.5"]
