"""Bit allocation over PCA coordinates by dynamic programming (KVTC, arXiv 2511.01815, section 3).

Coordinates ``0 .. r-1`` are PCA coordinates sorted by decreasing variance. An allocation cuts ``[0, r)`` into
consecutive groups and gives each a quantization type (``"none"`` prunes the group). A group of size ``g`` must
start at a multiple of ``g``: with that alignment there are only about ``r * len(sizes)`` candidate groups, few
enough to *measure* the distortion of every (group, type) pair on held-out tokens instead of modelling it.
The dynamic program then finds the allocation of least total distortion whose cost fits the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kvcal.codec.quantize import QUANT_TYPES, QuantGroup, check_qtype, fake_quantize, group_cost_bits
from kvcal.errors import RatioError

DEFAULT_GROUP_SIZES: tuple[int, ...] = (1, 16, 64, 256, 1024)
# Bounds one measurement chunk to 1M float32 elements (4 MiB per temporary): the quantizer makes several
# temporaries per chunk, and ones that stay in cache make the measurement ~1.5x faster on a CPU than big passes.
MAX_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class DistortionTable:
    """Measured distortions, one entry per (group size, aligned block, qtype).

    ``table[g][k, t]`` is the mean over held-out tokens of the squared error on coordinates
    ``[k * g, (k + 1) * g)`` when quantized as ``qtypes[t]``; only full aligned blocks are present.
    """

    r: int
    sizes: tuple[int, ...]
    qtypes: tuple[str, ...]
    table: dict[int, torch.Tensor]


@dataclass(frozen=True)
class BitAllocation:
    """Groups covering ``[0, r)`` in order (pruned ``"none"`` groups included), with their total cost and
    expected squared error per token. ``exact`` is False when the coarse-unit approximation was used."""

    groups: tuple[QuantGroup, ...]
    bits_per_token: int
    budget_bits: float
    distortion: float
    exact: bool = True

    def kept(self) -> int:
        """Number of coordinates that are quantized rather than pruned."""
        return sum(g.size for g in self.groups if g.qtype != "none")

    def used_rank(self) -> int:
        """Highest kept coordinate + 1: the PCA basis can be truncated to this many components."""
        return max((g.start + g.size for g in self.groups if g.qtype != "none"), default=0)


def budget_for_ratio(dims: int, ratio: float, source_bits: int = 16) -> float:
    """Bits per token allowed when ``dims`` values of ``source_bits`` bits are compressed ``ratio`` times."""
    if dims < 1 or source_bits < 1:
        raise ValueError(f"dims and source_bits must be positive, got {dims} and {source_bits}")
    if not math.isfinite(ratio) or ratio <= 1:
        raise RatioError(f"compression ratio must be a finite number above 1, got {ratio}")
    return dims * source_bits / ratio


def _checked_sizes(sizes: tuple[int, ...], r: int) -> tuple[int, ...]:
    if any(int(g) != g or g < 1 for g in sizes):
        raise ValueError(f"group sizes must be positive integers, got {sizes}")
    # Size 1 is always added so that every r can be covered whatever the other sizes are.
    return tuple(sorted({1, *(int(g) for g in sizes if g <= r)}))


def _checked_qtypes(qtypes: tuple[str, ...]) -> tuple[str, ...]:
    for qtype in qtypes:
        check_qtype(qtype)
    if len(set(qtypes)) != len(qtypes) or not qtypes:
        raise ValueError(f"qtypes must be non-empty and distinct, got {qtypes}")
    return tuple(qtypes)


def _block_errors(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """Squared error of each row of ``blocks`` [rows, g] under ``qtype``: [rows]."""
    if qtype == "none":
        # In float64 the squares of float32 values are exact, so pruning a block costs the sum of pruning its
        # parts to ~1e-16: allocate_bits relies on that additivity to merge pruned groups without losing anything.
        return blocks.double().square().sum(dim=1)
    return (fake_quantize(blocks, qtype) - blocks).square_().sum(dim=1)


def measure_distortions(
    coords: torch.Tensor,
    sizes: tuple[int, ...] = DEFAULT_GROUP_SIZES,
    qtypes: tuple[str, ...] = QUANT_TYPES,
    chunk_tokens: int = 4096,
) -> DistortionTable:
    """Measure every (group size, aligned block, qtype) distortion on held-out tokens.

    ``coords`` is float [n_tokens, r]: held-out calibration tokens projected on the (centered) basis. Sizes above
    ``r`` are skipped and size 1 is always included. Tokens are processed ``chunk_tokens`` at a time (fewer when
    a chunk would exceed ``MAX_CHUNK_ELEMENTS``), all blocks of one size quantized in a single call.
    """
    if coords.dim() != 2 or coords.shape[0] < 1 or coords.shape[1] < 1:
        raise ValueError(f"expected coords of shape [tokens >= 1, r >= 1], got {tuple(coords.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    n, r = coords.shape
    group_sizes = _checked_sizes(tuple(sizes), r)
    types = _checked_qtypes(tuple(qtypes))
    rows_per_chunk = max(1, min(chunk_tokens, MAX_CHUNK_ELEMENTS // r))
    sums = {g: torch.zeros(r // g, len(types), dtype=torch.float64, device=coords.device) for g in group_sizes}
    for first in range(0, n, rows_per_chunk):
        chunk = coords[first : first + rows_per_chunk].float()
        tokens = chunk.shape[0]
        for g in group_sizes:
            n_blocks = r // g
            blocks = chunk[:, : n_blocks * g].reshape(tokens * n_blocks, g)
            for t, qtype in enumerate(types):
                errors = _block_errors(blocks, qtype).view(tokens, n_blocks)
                # float64 across chunks: thousands of float32 partial sums would otherwise lose digits.
                sums[g][:, t] += errors.double().sum(dim=0)
    table = {g: (s / n).cpu() for g, s in sums.items()}
    return DistortionTable(r=r, sizes=group_sizes, qtypes=types, table=table)


@dataclass(frozen=True)
class _Option:
    size: int
    type_index: int
    cost_bits: int
    cost_units: int


def _check_table(table: DistortionTable) -> None:
    if 1 not in table.sizes:
        raise ValueError("the distortion table must contain group size 1 so that every coordinate can be covered")
    for g in table.sizes:
        values = table.table[g]
        if tuple(values.shape) != (table.r // g, len(table.qtypes)):
            raise ValueError(
                f"distortions for size {g} have shape {tuple(values.shape)}, "
                f"expected {(table.r // g, len(table.qtypes))}"
            )
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError(f"distortions for size {g} must be finite and non-negative")


def _cost_unit(costs: list[int], budget_bits: float, max_states: int) -> tuple[int, bool]:
    """The budget unit of the DP and whether it is exact.

    Every cost is a multiple of their gcd, so counting in gcd units loses nothing. When that needs more than
    ``max_states`` states, a coarser unit is used and costs are rounded *up* to it: the result stays feasible
    but is only near-optimal (small groups, whose cost is not a multiple of the unit, are penalised slightly).
    """
    unit = 0
    for cost in costs:
        unit = math.gcd(unit, cost)
    unit = max(unit, 1)
    if budget_bits / unit <= max_states:
        return unit, True
    return max(unit, math.ceil(budget_bits / max_states)), False


def _run_dp(
    r: int, options: list[_Option], distortions: dict[int, list[list[float]]], n_states: int
) -> tuple[np.ndarray, float]:
    """Pull-form DP over boundaries ``j`` (python loop) and budget units ``b`` (numpy vectors).

    ``f[j, b]`` = least distortion covering ``[0, j)`` with at most ``b`` units. Only the last ``max(size) + 1``
    rows of ``f`` are ever read, so they live in a ring buffer; the back-pointers (option index per (j, b)) are
    the only O(r * states) array, kept as int8/int16.
    """
    ring_rows = max(o.size for o in options) + 1
    f = np.full((ring_rows, n_states), np.inf)
    f[0] = 0.0  # the empty prefix costs nothing whatever the budget: this makes f "at most b units"
    pointer_dtype = np.int8 if len(options) <= np.iinfo(np.int8).max else np.int16
    choice = np.full((r + 1, n_states), -1, dtype=pointer_dtype)
    candidate = np.empty(n_states)
    better = np.empty(n_states, dtype=bool)
    by_size: dict[int, list[tuple[int, _Option]]] = {}
    for index, option in enumerate(options):
        if option.cost_units < n_states:  # an option dearer than the whole budget can never be chosen
            by_size.setdefault(option.size, []).append((index, option))
    sizes = sorted(by_size, reverse=True)
    for j in range(1, r + 1):
        current = f[j % ring_rows]
        current.fill(np.inf)
        pointers = choice[j]
        for g in sizes:
            if j % g:
                continue
            previous = f[(j - g) % ring_rows]
            block_distortions = distortions[g][j // g - 1]
            for index, option in by_size[g]:
                c = option.cost_units
                width = n_states - c
                cand, mask, target = candidate[:width], better[:width], current[c:]
                np.add(previous[:width], block_distortions[option.type_index], out=cand)
                np.less(cand, target, out=mask)
                np.copyto(target, cand, where=mask)
                np.copyto(pointers[c:], index, where=mask)
    return choice, float(f[r % ring_rows][n_states - 1])


def _backtrack(r: int, options: list[_Option], choice: np.ndarray, n_states: int) -> list[tuple[int, _Option]]:
    picked: list[tuple[int, _Option]] = []
    j, b = r, n_states - 1
    while j > 0:
        option = options[int(choice[j, b])]
        picked.append((j - option.size, option))
        j -= option.size
        b -= option.cost_units
    picked.reverse()
    return picked


def _retile_pruned(groups: list[QuantGroup], sizes: tuple[int, ...]) -> list[QuantGroup]:
    """Re-cut each run of consecutive ``"none"`` groups into the fewest aligned groups.

    Pruning is free and its distortion is additive, so the DP picks between one pruned block and its pieces on
    float rounding noise alone; canonical large groups keep the allocation short and readable.
    """
    out: list[QuantGroup] = []
    position = 0
    while position < len(groups):
        if groups[position].qtype != "none":
            out.append(groups[position])
            position += 1
            continue
        end = position
        while end < len(groups) and groups[end].qtype == "none":
            end += 1
        start, stop = groups[position].start, groups[end - 1].start + groups[end - 1].size
        while start < stop:
            g = max(s for s in sizes if start % s == 0 and start + s <= stop)
            out.append(QuantGroup(start, g, "none"))
            start += g
        position = end
    return out


def allocate_bits(table: DistortionTable, budget_bits: float, max_states: int = 4096) -> BitAllocation:
    """Least-distortion allocation with ``bits_per_token <= budget_bits``.

    Exact when ``budget_bits / gcd(option costs) <= max_states``; otherwise costs are rounded up to a coarser unit
    (``ceil(budget_bits / max_states)`` bits), which keeps the result feasible but only near-optimal
    (``exact=False``). Time is O(r * options * states) numpy work, memory O(r * states) bytes of back-pointers.
    Raises ``RatioError`` when the best allocation keeps no coordinate (the budget is too small).
    """
    if not math.isfinite(budget_bits) or budget_bits < 0:
        raise ValueError(f"budget_bits must be finite and non-negative, got {budget_bits}")
    if max_states < 1:
        raise ValueError(f"max_states must be positive, got {max_states}")
    _check_table(table)
    quantized = [group_cost_bits(q, g) for g in table.sizes for q in table.qtypes if q != "none"]
    if not quantized:
        raise ValueError(f"qtypes {table.qtypes} contain no quantization type: nothing could be kept")
    cheapest = min(quantized)
    costs = [group_cost_bits(q, g) for g in table.sizes for q in table.qtypes]
    unit, exact = _cost_unit(costs, budget_bits, max_states)
    options = [
        _Option(size=g, type_index=t, cost_bits=group_cost_bits(q, g), cost_units=-(-group_cost_bits(q, g) // unit))
        # Larger sizes first: on exactly equal distortion the DP keeps the first option, i.e. fewer groups.
        for g in sorted(table.sizes, reverse=True)
        for t, q in enumerate(table.qtypes)
    ]
    n_states = math.floor(budget_bits / unit) + 1
    distortions = {g: table.table[g].tolist() for g in table.sizes}
    choice, best = _run_dp(table.r, options, distortions, n_states)
    if not math.isfinite(best):
        raise RatioError(
            f"a budget of {budget_bits:g} bits/token cannot cover all {table.r} coordinates without pruning "
            f"(no 'none' type); use a lower compression ratio"
        )
    picked = _backtrack(table.r, options, choice, n_states)
    type_index = {q: t for t, q in enumerate(table.qtypes)}

    def total_distortion(groups: list[QuantGroup]) -> float:
        return sum(distortions[grp.size][grp.start // grp.size][type_index[grp.qtype]] for grp in groups)

    chosen = [QuantGroup(start, o.size, table.qtypes[o.type_index]) for start, o in picked]
    retiled = _retile_pruned(chosen, table.sizes)
    # Measured tables are additive for pruning, so re-tiling only moves the total by rounding noise; a table
    # that is not (hand-made, say) keeps the DP's own groups rather than losing optimality.
    chosen_distortion, retiled_distortion = total_distortion(chosen), total_distortion(retiled)
    if retiled_distortion <= chosen_distortion * (1 + 1e-9):
        chosen, chosen_distortion = retiled, retiled_distortion
    allocation = BitAllocation(
        groups=tuple(chosen),
        bits_per_token=sum(group_cost_bits(grp.qtype, grp.size) for grp in chosen),
        budget_bits=float(budget_bits),
        distortion=chosen_distortion,
        exact=exact,
    )
    if allocation.kept() == 0:
        raise RatioError(
            f"a budget of {budget_bits:g} bits/token keeps no coordinate (the cheapest quantized group costs "
            f"{cheapest} bits/token); use a lower compression ratio"
        )
    return allocation
