"""Calibration time, artifact overhead and explained-variance curves of the reference models (CPU or CUDA).

    python scripts/bench_calibrate.py                     # both reference models, their recipes' ratios
    python scripts/bench_calibrate.py --ratios 4 8 16 32 64 128

Writes each model's artifact to ``--work/<model>/`` (a temporary directory by default: the shipped artifacts are
never touched; ``--ship`` writes MODEL/kvcal/ instead), and ``results/bench_calibrate.json``,
``results/bench_calibrate.md`` and ``results/explained_variance.png``. Per ratio: the coordinates kept for keys and
values, their explained variance, and the bits per token the allocation expects.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvcal  # noqa: E402
from kvcal.data import artifacts_root  # noqa: E402
from kvcal.errors import KvcalError  # noqa: E402
from kvcal.plotting import pyplot, save_figure  # noqa: E402

MODELS = ("kvcal-ref-llama", "kvcal-ref-qwen3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append")
    ap.add_argument("--ratios", type=float, nargs="*", default=None, help="default: the recipe's ratios")
    ap.add_argument("--work", type=Path, default=None, help="where the artifacts go (default: a temporary directory)")
    ap.add_argument("--ship", action="store_true", help="write the shipped artifacts, MODEL/kvcal/")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out-dir", type=Path, default=Path("results"))
    args = ap.parse_args()
    rows, curves = [], {}
    work = args.work or Path(tempfile.mkdtemp(prefix="kvcal-bench-calibrate-"))
    for model_dir in args.model or [artifacts_root() / m for m in MODELS]:
        out = None if args.ship else work / model_dir.name
        t = time.perf_counter()
        report = kvcal.calibrate(model_dir, ratios=tuple(args.ratios) if args.ratios else None, device=args.device, out=out)
        seconds = time.perf_counter() - t
        art = report.artifact
        for kind in ("k", "v"):
            ev = (art.eigenvalues(kind, 0).double().cumsum(0) / float(art.tensors[f"{kind}.0.total_variance"])).tolist()
            curves[f"{model_dir.name} {kind}"] = ev
        row = {"model": model_dir.name, "seconds": round(seconds, 1), "tokens": art.meta["calibration"]["tokens"],
               "overhead_percent": art.meta["overhead"]["percent"], "artifact_bytes": report.path.stat().st_size,
               "device": art.meta["calibration"]["device"], "metric": art.meta["calibration"]["metric"],
               "budget": art.meta["calibration"]["budget"], "ratios": {}}
        for r, kinds in sorted(art.meta["allocations"].items(), key=lambda kv: float(kv[0])):
            row["ratios"][r] = {kind: {"kept": sum(g["kept"] for g in groups),
                                       "explained_variance": groups[0]["explained_variance"],
                                       "bits_per_token": round(sum(g["bits_per_token"] for g in groups), 1)}
                                for kind, groups in kinds.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "explained_variance": curves, "threads": torch.get_num_threads(),
              "command": "python " + " ".join(sys.argv)}
    (args.out_dir / "bench_calibrate.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"`{result['command']}` ({torch.get_num_threads()} threads)", "",
          "| model | device | metric, budget | calibration s | tokens | ratios | artifact MB | overhead % params |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['device']} | {r['metric']}, {r['budget']} | {r['seconds']} | {r['tokens']:,} | "
           f"{len(r['ratios'])} | {r['artifact_bytes'] / 1e6:.2f} | {r['overhead_percent']:.2f} |" for r in rows]
    md += ["", "| model | ratio | K kept coords (expl. var) | V kept coords (expl. var) | K + V bits per token |",
           "|---|---|---|---|---|"]
    for r in rows:
        for ratio, kinds in r["ratios"].items():
            md.append(f"| {r['model']} | {ratio} | {kinds['k']['kept']} ({kinds['k']['explained_variance']:.3f}) | "
                      f"{kinds['v']['kept']} ({kinds['v']['explained_variance']:.3f}) | "
                      f"{kinds['k']['bits_per_token'] + kinds['v']['bits_per_token']:.1f} |")
    md += ["", "Explained variance by the first n PCA components (cross-layer basis):", "",
           "| model | kind | 16 | 64 | 128 | 256 | 512 |", "|---|---|---|---|---|---|---|"]
    for name, ev in curves.items():
        m, kind = name.rsplit(" ", 1)
        md.append(f"| {m} | {kind} | " + " | ".join(f"{ev[min(n, len(ev)) - 1]:.3f}" for n in (16, 64, 128, 256, 512)) + " |")
    (args.out_dir / "bench_calibrate.md").write_text("\n".join(md) + "\n")
    try:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, ev in curves.items():
            ax.plot(range(1, len(ev) + 1), ev, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("PCA components kept")
        ax.set_ylabel("explained variance")
        ax.set_title("Cross-layer PCA of pre-RoPE keys and values")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, args.out_dir / "explained_variance.png")
    except KvcalError:
        print("matplotlib not installed: no plot (pip install kvcal[plot])")
    print("\n".join(md))


if __name__ == "__main__":
    main()
