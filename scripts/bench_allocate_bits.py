"""Time distortion measurement and DP bit allocation on synthetic power-law PCA spectra.

Held-out tokens are Gaussian with variance_i proportional to (i + 1)^-alpha, the shape of KV-cache PCA spectra.
Writes ``bench_allocate_bits.json`` and ``bench_allocate_bits.md`` under ``--out-dir``.

    python scripts/bench_allocate_bits.py --p 40960 --tokens 1024 --out-dir results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvcal.codec.quantize import QUANT_TYPES
from kvcal.fit.bits import DEFAULT_GROUP_SIZES, BitAllocation, allocate_bits, budget_for_ratio, measure_distortions

RATIOS = (8, 16, 32, 64)
ALPHAS = (0.8, 1.2)
SEED = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=40960, help="coordinates per token (PCA rank r = p)")
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens used to measure distortions")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="power-law exponents")
    parser.add_argument("--max-states", type=int, default=4096, help="allocate_bits max_states")
    parser.add_argument(
        "--exact-reference-states",
        type=int,
        default=8192,
        help="also solve exactly (max_states large enough) wherever that needs at most this many states",
    )
    return parser.parse_args()


def synthetic_coords(tokens: int, p: int, alpha: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    std = (torch.arange(p, dtype=torch.float32) + 1) ** (-alpha / 2)
    return torch.randn(tokens, p, generator=gen) * std


def timed_allocation(table, budget: float, max_states: int) -> tuple[BitAllocation, float]:
    start = time.perf_counter()
    allocation = allocate_bits(table, budget, max_states=max_states)
    return allocation, time.perf_counter() - start


def describe_allocation(allocation: BitAllocation, total_energy: float) -> dict:
    coordinates_per_type = Counter()
    for group in allocation.groups:
        coordinates_per_type[group.qtype] += group.size
    groups_per_size_type = Counter(f"{g.qtype}x{g.size}" for g in allocation.groups if g.qtype != "none")
    return {
        "bits_per_token": allocation.bits_per_token,
        "budget_used": allocation.bits_per_token / allocation.budget_bits,
        "distortion": allocation.distortion,
        "relative_distortion": allocation.distortion / total_energy,
        "kept": allocation.kept(),
        "used_rank": allocation.used_rank(),
        "groups": len(allocation.groups),
        "exact": allocation.exact,
        "coordinates_per_type": {q: coordinates_per_type.get(q, 0) for q in QUANT_TYPES},
        "quantized_groups": dict(sorted(groups_per_size_type.items())),
    }


def bench_alpha(args: argparse.Namespace, alpha: float) -> dict:
    coords = synthetic_coords(args.tokens, args.p, alpha, SEED)
    start = time.perf_counter()
    table = measure_distortions(coords, sizes=DEFAULT_GROUP_SIZES, qtypes=QUANT_TYPES)
    measure_s = time.perf_counter() - start
    # The all-"none" size-1 column is each coordinate's mean energy: the distortion of pruning everything.
    total_energy = float(table.table[1][:, QUANT_TYPES.index("none")].sum())
    runs = []
    for ratio in RATIOS:
        budget = budget_for_ratio(args.p, ratio)
        allocation, seconds = timed_allocation(table, budget, args.max_states)
        run = {
            "ratio": ratio,
            "budget_bits": budget,
            "allocate_s": seconds,
            **describe_allocation(allocation, total_energy),
        }
        exact_states = math.floor(budget / 2) + 1
        if not allocation.exact and exact_states <= args.exact_reference_states:
            exact, exact_seconds = timed_allocation(table, budget, exact_states)
            run["exact_reference"] = {
                "max_states": exact_states,
                "allocate_s": exact_seconds,
                "distortion": exact.distortion,
                "coarse_excess": allocation.distortion / exact.distortion - 1,
            }
        print(
            f"alpha={alpha} ratio={ratio}: allocate {seconds:.2f}s, kept {run['kept']}, "
            f"relative distortion {run['relative_distortion']:.4g}",
            flush=True,
        )
        runs.append(run)
    return {"alpha": alpha, "measure_distortions_s": measure_s, "total_energy": total_energy, "runs": runs}


def machine_info() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def markdown_report(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# bench_allocate_bits",
        "",
        (
            f"p = r = {report['p']} coordinates, {report['tokens']} held-out Gaussian tokens, group sizes "
            f"{report['sizes']}, types {report['qtypes']}, max_states {report['max_states']}."
        ),
        (
            f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs ({machine['cpus_available']} available), "
            f"torch {machine['torch']} with {machine['torch_threads']} thread(s), load average at end "
            f"{machine['load_average_at_end']}; peak RSS {report['peak_rss_mib']:.0f} MiB."
        ),
        "",
        (
            "| alpha | measure_distortions s | ratio | budget bits | allocate_bits s | bits used | kept | used rank "
            "| groups | relative distortion | exact | coarse excess vs exact |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        for run in result["runs"]:
            reference = run.get("exact_reference")
            excess = f"{reference['coarse_excess']:.2%} (exact in {reference['allocate_s']:.1f} s)" if reference else ""
            lines.append(
                f"| {result['alpha']} | {result['measure_distortions_s']:.2f} | {run['ratio']} | {run['budget_bits']:.0f} "
                f"| {run['allocate_s']:.2f} | {run['bits_per_token']} | {run['kept']} | {run['used_rank']} "
                f"| {run['groups']} | {run['relative_distortion']:.4g} | {run['exact']} | {excess} |"
            )
    lines += ["", "Coordinates per type:", ""]
    for result in report["results"]:
        for run in result["runs"]:
            lines.append(f"- alpha {result['alpha']}, ratio {run['ratio']}: {run['coordinates_per_type']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    args = parse_args()
    results = [bench_alpha(args, alpha) for alpha in args.alphas]
    report = {
        "p": args.p,
        "tokens": args.tokens,
        "sizes": list(DEFAULT_GROUP_SIZES),
        "qtypes": list(QUANT_TYPES),
        "max_states": args.max_states,
        "seed": SEED,
        "machine": machine_info(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_allocate_bits.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "bench_allocate_bits.md").write_text(markdown_report(report))
    print(f"wrote {args.out_dir / 'bench_allocate_bits.json'} and {args.out_dir / 'bench_allocate_bits.md'}")


if __name__ == "__main__":
    main()
