"""Reproduce the model-card figures of the committed reference models, offline, on the CPU.

    python scripts/check_reference_models.py                 # both models
    python scripts/check_reference_models.py --model artifacts/kvcal-ref-llama

For each model: held-out loss on the eval split (the card's 16 windows), the unigram baseline, and the
needle probe with the full cache and with the middle evicted (4 sinks + last 128). Prints a table and
exits non-zero if a figure is off the card by more than the tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvcal.data import artifacts_root, bundled_corpus, load_texts, token_stream  # noqa: E402
from kvcal.eval.retrieval import NeedleProbe, needle_accuracy  # noqa: E402
from kvcal.eval.scoring import evict_middle  # noqa: E402
from kvcal.models import load_model  # noqa: E402

MODELS = ("kvcal-ref-llama", "kvcal-ref-qwen3")


@torch.no_grad()
def measure(model_dir: Path, needles: bool = True) -> dict:
    card = json.loads((model_dir / "model_card.json").read_text())
    model, tok = load_model(model_dir, "cpu")
    seq = card["seq_len"]
    stream = token_stream(tok, load_texts([bundled_corpus("eval")]))
    heldout = stream[: (stream.numel() // seq) * seq].view(-1, seq)[: card["heldout_windows"]]
    loss = sum(float(model(input_ids=w[None], labels=w[None]).loss) for w in heldout) / heldout.shape[0]
    out = {"model": model_dir.name, "heldout_loss": loss, "heldout_ppl": math.exp(loss), "card": card}
    if needles:
        trials = NeedleProbe(context_len=seq, trials=card["needle_trials"], seed=1).build(tok, load_texts([bundled_corpus("eval")]))
        out["needle_full_cache"] = needle_accuracy(model, trials)
        out["needle_middle_evicted"] = needle_accuracy(model, trials, lambda c: evict_middle(c, 4, 128))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append")
    ap.add_argument("--tolerance", type=float, default=0.01)
    args = ap.parse_args()
    ok = True
    print("| model | held-out loss (card) | unigram loss | needle full (card) | needle evicted (card) |")
    print("|---|---|---|---|---|")
    for model_dir in args.model or [artifacts_root() / m for m in MODELS]:
        r = measure(model_dir)
        c = r["card"]
        print(f"| {r['model']} | {r['heldout_loss']:.4f} ({c['heldout_loss']}) | {c['unigram_heldout_loss']} | "
              f"{r['needle_full_cache']:.3f} ({c['needle_full_cache']}) | {r['needle_middle_evicted']:.3f} ({c['needle_middle_evicted']}) |")
        ok &= abs(r["heldout_loss"] - c["heldout_loss"]) <= args.tolerance
        ok &= abs(r["needle_full_cache"] - c["needle_full_cache"]) <= args.tolerance
        ok &= abs(r["needle_middle_evicted"] - c["needle_middle_evicted"]) <= args.tolerance
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
