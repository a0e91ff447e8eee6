"""`kvcal calibrate` on tiny models of every family: valid artifacts, fingerprints, errors, atomic writes."""

import json
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import EVAL_CORPUS, TINY_CAL
from fixtures import FAMILIES

import kvcal
from kvcal.artifact import ARTIFACT_FILE, Artifact, ratio_key
from kvcal.capture import StreamingMoments
from kvcal.cli import main
from kvcal.errors import ArtifactError, DataError, RatioError
from kvcal.fit.budgets import arithmetic_weights, attention_weights, pyramid_budgets
from kvcal.fit.pca import fit_pca_basis


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrate_every_family_writes_a_valid_artifact(calibrated, family):
    art = Artifact.load(calibrated(family))
    layout = art.layout
    assert art.ratios == [2.0, 4.0, 8.0]
    fp = art.fingerprint
    for key in ("model_type", "num_layers", "num_kv_heads", "head_dim", "rope", "config_sha256", "attention_sha256"):
        assert key in fp
    assert fp["num_layers"] == layout.num_layers
    for kind in ("k", "v"):
        for g, _layers in enumerate(art.groups):
            basis = art.basis(kind, g)
            assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)  # orthonormal columns
            kept = [int((art.steps(kind, g, r)[:, 0] > 0).sum()) for r in art.ratios]
            assert kept[0] >= kept[-1]  # a lower ratio never keeps fewer coordinates
    # One joint K/V budget: together the bases spend at most what each ratio allows, and fewer bits as it rises.
    dims = sum(art.basis(kind, g).shape[0] for kind in ("k", "v") for g in range(len(art.groups)))
    spent = [sum(b["bits_per_token"] for kind in ("k", "v") for b in art.meta["allocations"][ratio_key(r)][kind])
             for r in art.ratios]
    for r, bits in zip(art.ratios, spent):
        assert bits <= dims * 16 / r * (1 + 1e-6), (r, bits)
    assert spent == sorted(spent, reverse=True)
    meta = json.loads((calibrated(family) / "kvcal" / "kvcal.json").read_text())
    assert meta["overhead"]["percent"] > 0 and meta["calibration"]["tokens"] > 0


def test_artifact_refuses_another_model(calibrated, tiny_models):
    from kvcal.models import load_model

    other, _ = load_model(tiny_models["mistral"], "cpu")
    with pytest.raises(ArtifactError, match="another model"):
        kvcal.load(calibrated("llama"), ratio=4, model=other)


def test_artifact_refuses_corruption(calibrated, tmp_path):
    src = calibrated("llama") / "kvcal" / ARTIFACT_FILE
    data = src.read_bytes()
    (tmp_path / ARTIFACT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError):
        Artifact.load(tmp_path)
    (tmp_path / ARTIFACT_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ArtifactError):
        Artifact.load(tmp_path)
    with pytest.raises(ArtifactError, match="no kvcal artifact"):
        Artifact.load(tmp_path / "nothing")


def test_calibration_is_deterministic(tiny_models, tmp_path):
    a = kvcal.calibrate(tiny_models["qwen3"], data=[EVAL_CORPUS], out=tmp_path / "a", progress=False, **TINY_CAL)
    b = kvcal.calibrate(tiny_models["qwen3"], data=[EVAL_CORPUS], out=tmp_path / "b", progress=False, **TINY_CAL)
    assert a.path.read_bytes() == b.path.read_bytes()


def test_per_layer_grouping(tiny_models, tmp_path):
    rep = kvcal.calibrate(tiny_models["llama"], data=[EVAL_CORPUS], out=tmp_path, progress=False,
                          **{**TINY_CAL, "pca_grouping": "per-layer"})
    assert rep.artifact.groups == [(0,), (1,)]


def test_bad_inputs(tiny_models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="no text"):
        kvcal.calibrate(tiny_models["llama"], data=[empty], out=tmp_path / "o", progress=False)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(DataError, match="fewer than one sequence"):
        kvcal.calibrate(tiny_models["llama"], data=[short], out=tmp_path / "o", progress=False)
    with pytest.raises(RatioError, match="greater than 1"):
        kvcal.calibrate(tiny_models["llama"], data=[EVAL_CORPUS], ratios=(0.5,), out=tmp_path / "o", progress=False)
    with pytest.raises(RatioError):  # a budget below one quantized group: nothing could be kept
        kvcal.calibrate(tiny_models["llama"], data=[EVAL_CORPUS], out=tmp_path / "o", progress=False,
                        **{**TINY_CAL, "ratios": (5000.0,)})
    assert not (tmp_path / "o" / ARTIFACT_FILE).exists()


def test_cli_errors_are_one_line(tiny_models, tmp_path):
    runner = CliRunner()
    for args in (["calibrate", str(tmp_path / "missing")], ["calibrate", str(tiny_models["llama"]), "--ratio", "0.5"],
                 ["calibrate", str(tiny_models["llama"]), "--data", str(tmp_path / "nope.txt")]):
        res = runner.invoke(main, args)
        assert res.exit_code == 2, res.output
        assert res.output.count("\n") == 1 and res.output.startswith("kvcal: error:")
        assert "Traceback" not in res.output


def test_cli_calibrate_json(tiny_models, tmp_path):
    res = CliRunner().invoke(main, ["calibrate", str(tiny_models["phi3"]), "--data", str(EVAL_CORPUS), "--out",
                                    str(tmp_path), "--ratio", "4", "--seq-len", "256", "--max-tokens", "2048", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    art = Artifact.load(tmp_path)
    dims = sum(art.basis(kind, 0).shape[0] for kind in ("k", "v"))
    spent = sum(summary["ratios"]["4"][kind][0]["bits_per_token"] for kind in ("k", "v"))
    assert 0 < spent <= dims * 16 / 4 * (1 + 1e-6)


def test_unwritable_output_and_atomic_write(tiny_models, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="cannot write"):
        kvcal.calibrate(tiny_models["llama"], data=[EVAL_CORPUS], out=blocker / "sub", progress=False, **TINY_CAL)
    # An interrupted write leaves the previous artifact intact and no temporary file behind.
    out = tmp_path / "art"
    first = kvcal.calibrate(tiny_models["llama"], data=[EVAL_CORPUS], out=out, progress=False, **TINY_CAL)
    before = first.path.read_bytes()

    def explode(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", explode)
    with pytest.raises(KeyboardInterrupt):
        kvcal.calibrate(tiny_models["llama"], data=[EVAL_CORPUS], out=out, progress=False, **{**TINY_CAL, "ratios": (3.0,)})
    assert first.path.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["kvcal.json", ARTIFACT_FILE]


def test_pca_recovers_a_known_basis():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    scales = torch.logspace(1, -2, 12, dtype=torch.float64)
    x = (torch.randn(20000, 12, generator=gen, dtype=torch.float64) * scales) @ q.T + 3.0
    m = StreamingMoments(12, torch.device("cpu"))
    for chunk in x.split(1000):
        m.add(chunk)
    basis = fit_pca_basis(m, rank_cap=6)
    assert basis.basis.shape == (12, 6)
    assert torch.allclose(basis.mean.double(), torch.full((12,), 3.0, dtype=torch.float64), atol=0.05)
    assert torch.allclose((basis.basis.double().T @ q[:, :6]).abs().diagonal(), torch.ones(6, dtype=torch.float64), atol=1e-2)
    ev = basis.explained_variance()
    assert bool((ev[1:] >= ev[:-1]).all()) and float(ev[-1]) <= 1.0


@pytest.mark.parametrize("total", [6, 50, 1000, 4097])
def test_pyramid_budgets_preserve_total_and_shape(total):
    w = arithmetic_weights(6, beta=20)
    b = pyramid_budgets(total, w, min_tokens=1)
    assert sum(b) == total and all(x >= 1 for x in b)
    assert all(b[i] >= b[i + 1] for i in range(5))  # pyramid: never increasing with depth
    if total >= 50:  # even small budgets keep their shape instead of falling back to uniform
        assert b[0] > b[-1]


def test_budgets_follow_attention_entropy_and_bounds():
    w = attention_weights(torch.tensor([1.0, 3.0, 2.0, 5.0]))
    b = pyramid_budgets(400, w, min_tokens=10, max_tokens=300)
    assert sum(b) == 400 and b[3] == max(b) and b[0] == min(b) and min(b) >= 10
    with pytest.raises(RatioError):
        pyramid_budgets(5, w, min_tokens=2)


def test_unwritable_output_fails_before_the_model_loads(tiny_models, tmp_path, monkeypatch):
    """The API checks its destination first: a bad --out costs no capture or fitting."""
    import kvcal.calibration as calibration

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(calibration, "load_model", no_model_load)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="cannot write the artifact"):
        kvcal.calibrate(tiny_models["llama"], data=[EVAL_CORPUS], out=blocker / "sub", progress=False, **TINY_CAL)


def test_text_summary_lists_every_ratio_in_order(calibrated):
    from kvcal.cli import render_calibration

    art = Artifact.load(calibrated("llama"))
    summary = {"artifact": "x", "model_type": "llama", "tokens": 1, "sequences": 1, "pca_grouping": "cross-layer",
               "seconds": 1.0, "overhead_percent": 1.0, "ratios": art.meta["allocations"]}
    lines = [line.split() for line in render_calibration(summary).splitlines()[4:]]
    assert [float(cols[0]) for cols in lines] == sorted(float(cols[0]) for cols in lines)
    assert {(float(cols[0]), cols[1]) for cols in lines} == {(r, kind) for r in art.ratios for kind in ("k", "v")}
