"""scripts/bench_gpu.py: the parts that need no GPU (the exact overhead arithmetic, the refusal to invent figures)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_configs_have_the_published_parameter_counts(bench):
    assert bench.model_parameters(bench.config_for("llama-3.1-8b", False)) == 8_030_261_248
    assert bench.model_parameters(bench.config_for("mistral-nemo-12b", False)) == 12_247_782_400


def test_overhead_arithmetic(bench):
    rows = bench.overhead_rows("llama-3.1-8b", bench.config_for("llama-3.1-8b", False), [1024])
    by = {(r["grouping"], r.get("rank")): r for r in rows}
    # cross-layer, rank r: 2 kinds x (p + p r) + 2 kinds x 2 (weight, inverse) x 256 blocks x 128^2
    p, r, blocks = 32 * 8 * 128, 1024, 32 * 8
    assert by[("cross-layer", r)]["stored_parameters"] == 2 * (p + p * r) + 4 * blocks * 128 * 128
    assert by[("per-layer", 1024)]["stored_parameters"] == 32 * 2 * (1024 + 1024 * 1024) + 4 * blocks * 128 * 128
    limit = next(row["max_rank_within_goal"] for row in rows if row["grouping"] == "cross-layer" and "rank" not in row)
    share = lambda rank: 100 * (2 * (p + p * rank) + 4 * blocks * 128 * 128) / 8_030_261_248  # noqa: E731
    assert share(limit) <= 2.4 < share(limit + 1)


def test_overhead_matches_what_calibrate_records(bench, calibrated):
    """The bench counts with the function calibrate itself uses: same number on a real artifact."""
    from kvcal.artifact import Artifact
    from kvcal.calibration import overhead_parameters

    artifact = Artifact.load(calibrated("llama"))
    assert overhead_parameters(artifact.tensors) == artifact.meta["overhead"]["stored_parameters"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_run_the_gpu_benchmark_without_a_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no CUDA device" in done.stderr
    assert not (tmp_path / "bench_gpu.json").exists()
