from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fixtures import write_tiny_model  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add overhead and contention
EVAL_CORPUS = Path(__file__).resolve().parents[1] / "artifacts" / "corpus" / "eval.jsonl"
TINY_CAL = dict(seq_len=256, max_tokens=256 * 12, ratios=(2, 4, 8), window=32, heldout_tokens=1024, heldout_every=2)


class TinyModels(dict):
    """``{family: dir}`` of tiny random models, each written on first use and kept for the session."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Path:
        self[family] = write_tiny_model(family, self.root / family)
        return self[family]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random models of any fixture family (``FAMILIES`` and ``MLA_FAMILIES``), written on first use."""
    return TinyModels(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def calibrated(tiny_models):
    """Calibrate a tiny model once per session and family; returns its directory."""
    import kvcal

    done: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in done:
            kvcal.calibrate(tiny_models[family], data=[EVAL_CORPUS], device="cpu", progress=False, **TINY_CAL)
            done[family] = tiny_models[family]
        return done[family]

    return get


@pytest.fixture(scope="module")
def llama(calibrated):
    """The calibrated tiny llama: ``(model_dir, model, tokenizer)``."""
    from kvcal.models import load_model

    model_dir = calibrated("llama")
    model, tokenizer = load_model(model_dir, "cpu")
    return model_dir, model, tokenizer


@pytest.fixture(scope="module")
def texts():
    from kvcal.data import load_texts

    return load_texts([EVAL_CORPUS])
