"""The needle probe: a span planted in the middle of a long context, later asked for by its start.

The needle is a run of random words (so nothing but the context can predict it), planted at the
middle of natural text. After the context, its first ``prompt_len`` tokens are repeated and the
model must continue with the rest; the score is greedy token accuracy over those tokens.
Because the needle sits in the middle, evicting the middle must destroy the score: that control
is what makes the probe a measure of the middle of the cache and not of the recent window.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

import torch

from kvcal.data import token_stream
from kvcal.eval.scoring import CacheTransform, continue_from, prefill


@dataclass(frozen=True)
class NeedleTrial:
    context: torch.Tensor  # [n] tokens up to and including the needle's repeated prompt
    target: torch.Tensor  # [m] the needle tokens the model must produce
    needle_start: int


@dataclass(frozen=True)
class NeedleProbe:
    context_len: int = 1024
    needle_len: int = 32
    prompt_len: int = 8
    trials: int = 16
    seed: int = 0

    def build(self, tokenizer, texts: list[str]) -> list[NeedleTrial]:
        rng = random.Random(self.seed)
        words = needle_vocabulary(texts)
        stream = token_stream(tokenizer, texts)
        trials = []
        for _ in range(self.trials):
            needle = random_word_tokens(tokenizer, words, self.needle_len, rng)
            background_len = self.context_len - self.needle_len - self.prompt_len
            start = rng.randrange(0, stream.numel() - background_len)
            background = stream[start : start + background_len]
            mid = background_len // 2
            context = torch.cat([background[:mid], needle, background[mid:], needle[: self.prompt_len]])
            trials.append(NeedleTrial(context, needle[self.prompt_len :], mid))
        return trials


def needle_vocabulary(texts: list[str], size: int = 2000) -> list[str]:
    counts = Counter(w for t in texts for w in re.findall(r"\b[a-z]{3,10}\b", t))
    return sorted(w for w, _ in counts.most_common(size))


def random_word_tokens(tokenizer, words: list[str], n_tokens: int, rng: random.Random) -> torch.Tensor:
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids.extend(tokenizer(" " + rng.choice(words), add_special_tokens=False)["input_ids"])
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


@torch.no_grad()
def needle_accuracy(model, trials: list[NeedleTrial], transform: CacheTransform | None = None) -> float:
    """Greedy token accuracy of producing each needle, after ``transform`` is applied to the cache.

    The context's last token is held back and fed after the transform, so every scored prediction
    is made through the transformed cache.
    """
    hits = total = 0
    for t in trials:
        cache = prefill(model, t.context[None, :-1])
        if transform is not None:
            cache = transform(cache)
        feed = torch.cat([t.context[-1:], t.target[:-1]])[None]
        logits = continue_from(model, cache, feed, start_position=t.context.numel() - 1)
        pred = logits[0].argmax(-1).cpu()
        hits += int((pred == t.target).sum())
        total += t.target.numel()
    return hits / total
