"""The ``kvcal`` command: a thin click layer over the Python API.

Every user error is a ``KvcalError``: printed as one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kvcal import __version__
from kvcal.errors import KvcalError


class KvcalGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KvcalError as e:
            click.echo(f"kvcal: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("kvcal: interrupted; nothing was written", err=True)
            sys.exit(130)


@click.group(cls=KvcalGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvcal")
def main() -> None:
    """KV-cache transform coding (KVTC) calibration and evaluation for Hugging Face causal LMs."""


@main.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help=".txt/.md/.rst files, directories of them, or .jsonl with a \"text\" field (repeatable).")
@click.option("--recipe", type=click.Path(path_type=Path), help="TOML recipe (default: recipes/<model_type>.toml).")
@click.option("--ratio", "ratios", multiple=True, type=float, help="Target compression ratio vs bf16 (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (default: MODEL_DIR/kvcal).")
@click.option("--sink", type=int, help="Attention-sink tokens kept exact (default 4).")
@click.option("--window", type=int, help="Recent tokens kept exact (default 128).")
@click.option("--max-tokens", type=int, help="Calibration tokens to use at most.")
@click.option("--seq-len", type=int, help="Calibration sequence length.")
@click.option("--grouping", "pca_grouping", type=click.Choice(["cross-layer", "per-layer"]), help="PCA grouping.")
@click.option("--rank-cap", type=int, help="Keep at most this many PCA components.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def calibrate(model_dir, data, recipe, ratios, out, sink, window, max_tokens, seq_len, pca_grouping, rank_cap, device, as_json):
    """Fit PCA bases, DP bit allocations and PyramidKV budgets; write MODEL_DIR/kvcal/.

    With no MODEL_DIR, calibrates the bundled reference model on the bundled corpus.
    """
    from kvcal.calibration import calibrate as run

    report = run(
        model_dir, data=list(data) or None, recipe=recipe, out=out, device=device, progress=not as_json,
        ratios=tuple(ratios), sink=sink, window=window, max_tokens=max_tokens, seq_len=seq_len,
        pca_grouping=pca_grouping, rank_cap=rank_cap,
    )
    summary = report.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(render_calibration(summary))


def render_calibration(s: dict) -> str:
    lines = [
        f"kvcal artifact: {s['artifact']}",
        f"model: {s['model_type']}   tokens: {s['tokens']:,} in {s['sequences']} sequences   "
        f"grouping: {s['pca_grouping']}   time: {s['seconds']:.1f} s   overhead: {s['overhead_percent']:.2f}% of model parameters",
        "",
        f"{'ratio':>6} {'kind':>4} {'bits/token':>10} {'expected':>9} {'kept coords':>11} {'expl.var':>9}  types",
    ]
    for ratio, kinds in s["ratios"].items():
        for kind, groups in kinds.items():
            for g in groups:
                kept = sum(n for t, n in g["coordinates"].items() if t != "none")
                types = " ".join(f"{t}:{n}" for t, n in sorted(g["coordinates"].items()))
                lines.append(f"{ratio:>6} {kind:>4} {g['bits_per_token']:>10} {g['expected_ratio']:>8.1f}x {kept:>11} "
                             f"{g['explained_variance']:>9.4f}  {types}")
    return "\n".join(lines)


def _add_optional_commands() -> None:
    try:
        from kvcal.eval.commands import eval_command, inspect_command
    except ImportError:  # the eval package is optional at import time only while it is being built
        return
    main.add_command(eval_command, "eval")
    main.add_command(inspect_command, "inspect")


_add_optional_commands()


if __name__ == "__main__":
    main()
