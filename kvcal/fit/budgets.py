"""PyramidKV per-layer token budgets: how many middle tokens each layer keeps in eviction mode.

Budgets are integers whose sum is exactly the total asked for. Shapes come either from attention
statistics measured at calibration (layers whose last queries spread attention over more tokens get
more, as CAKE and HeadKV argue) or from PyramidKV's arithmetic schedule. Small totals keep their shape
(clamped to a per-layer minimum, with the remainder redistributed) instead of silently turning uniform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcal.errors import RatioError


def arithmetic_weights(n_layers: int, beta: float = 20.0) -> torch.Tensor:
    """PyramidKV's schedule: linearly decreasing from the first layer to the last; mean 1.

    The last layer gets ``1/beta`` of the average and the first ``2 - 1/beta`` of it.
    """
    if n_layers == 1:
        return torch.ones(1, dtype=torch.float64)
    lo, hi = 1.0 / beta, 2.0 - 1.0 / beta
    return torch.linspace(hi, lo, n_layers, dtype=torch.float64)


def attention_weights(mean_entropy: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Weights ∝ exp(entropy / temperature): the effective number of tokens a layer's queries attend to."""
    h = mean_entropy.double()
    w = torch.exp((h - h.max()) / temperature)
    return w / w.mean()


def pyramid_budgets(
    total: int,
    weights: Sequence[float] | torch.Tensor,
    min_tokens: int = 1,
    max_tokens: int | None = None,
) -> list[int]:
    """Integer budgets ∝ ``weights`` with ``min_tokens <= b <= max_tokens`` and ``sum(b) == total`` exactly."""
    w = torch.as_tensor(weights, dtype=torch.float64).clamp_min(0)
    n = w.numel()
    hi = float("inf") if max_tokens is None else max_tokens
    if total < n * min_tokens or total > n * hi:
        raise RatioError(
            f"a total budget of {total} tokens cannot be split over {n} layers with {min_tokens}..{max_tokens} "
            "tokens each; change the budget or the per-layer bounds"
        )
    if float(w.sum()) == 0:
        w = torch.ones(n, dtype=torch.float64)
    # Water-filling: layers that hit a bound are fixed there; the rest share what is left by weight.
    share = torch.zeros(n, dtype=torch.float64)
    free = torch.ones(n, dtype=torch.bool)
    for _ in range(n + 1):
        left = total - float(share[~free].sum())
        share[free] = left * w[free] / max(float(w[free].sum()), 1e-300)
        low, high = free & (share < min_tokens), free & (share > hi)
        if not (low.any() or high.any()):
            break
        share[low], share[high] = float(min_tokens), hi
        free &= ~(low | high)
    # Largest remainder keeps the exact total after rounding down.
    budgets = share.floor().long()
    room = (torch.full_like(share, hi) - budgets.double()) >= 1
    remainder = torch.where(room, share - budgets.double(), torch.full_like(share, -1.0))
    deficit = total - int(budgets.sum())
    order = torch.argsort(-remainder, stable=True)
    budgets[order[:deficit]] += 1
    return budgets.tolist()
