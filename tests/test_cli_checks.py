"""The command line fails before work, in one line: arguments, output paths, ratios; and its smaller promises
(no transformers deprecation noise, --verbose detail, method aliases, --list-methods, plots not clipped)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import EVAL_CORPUS

import kvcal.calibration
import kvcal.models
from kvcal.artifact import fingerprint_error
from kvcal.cli import main
from kvcal.eval.methods import METHOD_FAMILIES, METHODS, expand_method_names, get_method

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "artifacts" / "kvcal-ref-llama"  # only for checks that fail before the model or artifact is read


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the error must come before the (slow) work."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(kvcal.calibration, "load_model", boom)
    monkeypatch.setattr(kvcal.models, "load_model", boom)


def one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("kvcal: error:"), res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in res.output, res.output


@pytest.fixture
def blocker(tmp_path):
    """A regular file: nothing can be created below it (works as root too, unlike permission bits)."""
    f = tmp_path / "file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("ratio", ["nan", "inf", "-inf", "1", "0.5", "-3", "abc"])
def test_calibrate_refuses_bad_ratios_before_work(no_model_load, ratio):
    t0 = time.time()
    res = CliRunner().invoke(main, ["calibrate", str(REF), "--ratio", "8", "--ratio", ratio])
    one_line_error(res, "--ratio")
    assert time.time() - t0 < 5


def test_calibrate_refuses_unwritable_out_before_work(no_model_load, blocker, tmp_path):
    res = CliRunner().invoke(main, ["calibrate", str(REF), "--out", str(blocker / "sub")])
    one_line_error(res, "--out", "not a directory")
    res = CliRunner().invoke(main, ["calibrate", str(REF), "--out", str(blocker)])
    one_line_error(res, "--out", "not a directory")


def test_calibrate_checks_the_default_output_dir_before_work(no_model_load, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "kvcal").write_text("a file where the artifact folder should go")
    one_line_error(CliRunner().invoke(main, ["calibrate", str(model)]), "MODEL_DIR/kvcal", "not a directory")


@pytest.mark.parametrize("opt,value", [("--sink", "-1"), ("--window", "-5"), ("--max-tokens", "0"), ("--seq-len", "-1"),
                                       ("--rank-cap", "0"), ("--sink", "four")])
def test_calibrate_refuses_bad_integers_in_one_line(no_model_load, opt, value):
    one_line_error(CliRunner().invoke(main, ["calibrate", str(REF), opt, value]), opt)


@pytest.mark.parametrize("opt", ["--json", "--plot"])
def test_eval_refuses_unwritable_outputs_before_work(no_model_load, blocker, opt):
    res = CliRunner().invoke(main, ["eval", str(REF), opt, str(blocker / "r.out")])
    one_line_error(res, opt)
    res = CliRunner().invoke(main, ["eval", str(REF), "--ratio", "nan"])
    one_line_error(res, "--ratio nan")


def test_inspect_refuses_unwritable_plot(blocker, tmp_path):
    one_line_error(CliRunner().invoke(main, ["inspect", str(REF), "--plot", str(blocker / "a.png")]), "--plot")
    one_line_error(CliRunner().invoke(main, ["inspect", str(REF), "--plot", str(tmp_path)]), "--plot")


def test_a_write_that_fails_late_is_one_line(calibrated, monkeypatch, tmp_path):
    from kvcal.inspect import ArtifactSummary

    def full_disk(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ArtifactSummary, "plot", full_disk)
    res = CliRunner().invoke(main, ["inspect", str(calibrated("llama")), "--plot", str(tmp_path / "a.png")])
    one_line_error(res, "No space left on device", "--plot")


def test_fingerprint_mismatch_is_one_short_line():
    fp = {"model_type": "llama", "num_layers": 4, "config_sha256": "a" * 64, "attention_sha256": "b" * 64}
    msg = fingerprint_error(fp, {**fp, "config_sha256": "c" * 64, "attention_sha256": "d" * 64})
    assert "config and attention weights differ" in msg and "--verbose" in msg and "a" * 16 not in msg
    assert len(msg) < 160
    assert "layer count differs" in fingerprint_error(fp, {**fp, "num_layers": 5})


def test_cli_mismatch_detail_only_with_verbose(calibrated):
    args = ["eval", str(calibrated("llama")), "--artifact", str(calibrated("qwen3") / "kvcal"), "--method", "kvtc", "--windows", "1",
            "--needles", "0", "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(main, args)
    one_line_error(res, "another model", "attention weights")
    assert len(res.output) < 200
    res = CliRunner().invoke(main, [*args, "--verbose"])
    assert res.exit_code == 2 and "kvcal: detail:" in res.output and "attention_sha256 (artifact '" in res.output


def test_method_aliases():
    assert expand_method_names(["kivi", "turboquant2.5", "streaming-llm", "pyramid-kv", "snap-kv", "SnapKV", "TurboQuant_Prod-3.5"]) == [
        "kivi2", "turboquant-2.5", "streamingllm", "pyramidkv", "snapkv", "turboquant-prod-3.5"]
    assert get_method("kivi").name == "kivi2"
    assert expand_method_names(["turbo-quant"]) == list(METHOD_FAMILIES["turboquant"])


def test_list_methods_prints_every_method_with_its_summary(no_model_load):
    res = CliRunner().invoke(main, ["eval", "--list-methods"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    for name, cls in METHODS.items():
        assert any(line.split()[0] == name and cls.summary in line for line in lines), name
    assert "kivi = kivi2" in res.output


def test_cli_output_has_no_transformers_deprecation_notices(calibrated, tmp_path):
    # A real process: pytest records warnings itself, so only a subprocess shows what a user sees.
    cmd = [sys.executable, "-m", "kvcal.cli", "eval", str(calibrated("llama")), "--data", str(EVAL_CORPUS), "--prefix",
           "160", "--continuation", "8", "--window", "32", "--windows", "1", "--needles", "0", "--method", "int4",
           "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert "int4" in res.stdout
    assert "FutureWarning" not in out and "past_key_values" not in out, out


def test_saved_figures_keep_legends_outside_the_axes(tmp_path):
    from kvcal.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    for i in range(12):
        ax.plot([1, 2], [i, i + 1], label=f"method {i}")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3)  # below the figure's own area
    out = save_figure(fig, tmp_path / "f.png")
    png = out.read_bytes()
    height = int.from_bytes(png[20:24], "big")
    assert height > 3 * 110 + 20  # the saved image grew to hold the legend instead of cutting it off
