"""``kvcal inspect``: figures recomputed from the artifact's tensors agree with calibration, JSON, plot, CLI."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kvcal.artifact import Artifact, ratio_key
from kvcal.cli import main
from kvcal.inspect import inspect_artifact

COORD_TYPES = ("gaussian", "laplace", "pruned")


def test_summary_fields_and_coordinates_sum_to_the_rank(calibrated):
    model_dir = calibrated("llama")
    summary = inspect_artifact(model_dir)
    doc = json.loads(json.dumps(summary.to_json()))
    for key in ("path", "file_bytes", "fingerprint", "calibration", "overhead", "layout", "groups", "ratios",
                "budget_weights", "example_budgets", "example_middle_tokens"):
        assert key in doc, key
    assert doc["file_bytes"] > 0 and doc["overhead"]["percent"] > 0
    meta = Artifact.load(model_dir).meta["allocations"]
    for r in doc["ratios"]:
        for b in r["bases"]:
            assert set(b["coordinates"]) == set(COORD_TYPES)
            assert sum(b["coordinates"].values()) == b["rank"] == b["dim"]
            recorded = meta[ratio_key(r["ratio"])][b["kind"]][b["group"]]
            # inspect recomputes each symbol model's own entropy; calibration recorded the held-out codes'
            # cross-entropy under it. A calibrated model is one whose entropy matches the data's: within 3%.
            assert abs(b["bits_per_token"] - recorded["bits_per_token"]) <= 0.03 * recorded["bits_per_token"] + 0.5
            assert b["kept"] if "kept" in b else True
            assert 0.0 < b["explained_variance"] <= 1.0
        assert r["bits_per_token"] == sum(b["bits_per_token"] for b in r["bases"])
    # Fewer bits keep less variance.
    by_ratio = sorted(doc["ratios"], key=lambda r: r["ratio"])
    for kind_index in range(len(by_ratio[0]["bases"])):
        kept = [r["bases"][kind_index]["explained_variance"] for r in by_ratio]
        assert kept == sorted(kept, reverse=True)


def test_example_budgets_spend_the_equal_memory_total(calibrated):
    summary = inspect_artifact(calibrated("gemma2"))  # sliding layers are kept exact and have no budget
    middle = summary.example_middle_tokens
    layout = Artifact.load(summary.path).layout
    for ratio, budgets in summary.example_budgets.items():
        assert [i for i, b in enumerate(budgets) if b is None] == list(layout.exact_layers)
        assert sum(b for b in budgets if b is not None) == round(middle / float(ratio)) * len(layout.coded_layers)
    assert [w for i, w in enumerate(summary.budget_weights) if i in layout.exact_layers] == [0.0] * len(layout.exact_layers)


def test_text_and_plot(calibrated, tmp_path):
    summary = inspect_artifact(calibrated("llama") / "kvcal")
    text = summary.text()
    assert "PyramidKV budget weights" in text and "fingerprint" in text
    path = summary.plot(tmp_path / "artifact.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_inspect(calibrated, tmp_path):
    model_dir = calibrated("llama")
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(model_dir), "--json", "--plot", str(tmp_path / "a.png")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["fingerprint"]["model_type"] == "llama"
    assert (tmp_path / "a.png").is_file()
    res = runner.invoke(main, ["inspect", str(model_dir)])
    assert res.exit_code == 0 and "bits/tok" in res.output
    res = runner.invoke(main, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and res.output.startswith("kvcal: error:")
