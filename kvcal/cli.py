"""The ``kvcal`` command: a thin click layer over the Python API.

Every user error is a ``KvcalError``: printed as one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import click

from kvcal import __version__
from kvcal.clitools import check_output_dir, check_ratios, is_verbose, verbose_option
from kvcal.errors import KvcalError


class _DropPastKeyValuesNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "past_key_values" not in record.getMessage()


_DROP_NOTICE = _DropPastKeyValuesNotice()


def quiet_transformers_deprecations() -> None:
    """Keep transformers' ``past_key_values`` deprecation notices (FutureWarning and log line) out of CLI output.

    kvcal passes caches the way every transformers 5.x release accepts; the notices are for library authors.
    Call inside ``warnings.catch_warnings()`` to scope the filter (the log filter is idempotent).
    """
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
    logging.getLogger("transformers.utils.generic").addFilter(_DROP_NOTICE)


class KvcalGroup(click.Group):
    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                quiet_transformers_deprecations()
                return super().invoke(ctx)
        except KvcalError as e:
            click.echo(f"kvcal: error: {e}", err=True)
            if e.detail and is_verbose(ctx):
                click.echo(f"kvcal: detail: {e.detail}", err=True)
            sys.exit(2)
        except click.UsageError as e:
            # A bad option value of a subcommand (``--ratio abc``): one line too, with where to find the usage.
            if e.ctx is None or e.ctx is ctx:
                raise
            click.echo(f"kvcal: error: {e.format_message()} (see kvcal {e.ctx.info_name} --help)", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("kvcal: interrupted; nothing was written", err=True)
            sys.exit(130)


@click.group(cls=KvcalGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvcal")
@verbose_option
def main() -> None:
    """KV-cache transform coding (KVTC) calibration and evaluation for Hugging Face causal LMs."""


@main.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help=".txt/.md/.rst files, directories of them, or .jsonl with a \"text\" field (repeatable).")
@click.option("--recipe", type=click.Path(path_type=Path), help="TOML recipe (default: the shipped kvcal/recipes/<model_type>.toml).")
@click.option("--ratio", "ratios", multiple=True, type=float, help="Target compression ratio vs bf16 (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (default: MODEL_DIR/kvcal).")
@click.option("--sink", type=int, help="Attention-sink tokens kept exact (default 4).")
@click.option("--window", type=int, help="Recent tokens kept exact (default 128).")
@click.option("--max-tokens", type=int, help="Calibration tokens to use at most.")
@click.option("--seq-len", type=int, help="Calibration sequence length.")
@click.option("--grouping", "pca_grouping", type=click.Choice(["cross-layer", "per-layer"]), help="PCA grouping.")
@click.option("--rank-cap", type=int, help="Keep at most this many PCA components.")
@click.option("--metric", type=click.Choice(["attention", "mse"]),
              help="Error the allocation minimises: as attention output sees it, or plain squared error (ablation).")
@click.option("--budget", type=click.Choice(["joint", "split"]),
              help="One bit budget for keys and values together, or each kind its share (ablation).")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@verbose_option
def calibrate(model_dir, data, recipe, ratios, out, sink, window, max_tokens, seq_len, pca_grouping, rank_cap, metric, budget, device,
              as_json):
    """Fit PCA bases, DP bit allocations and PyramidKV budgets; write MODEL_DIR/kvcal/.

    With no MODEL_DIR, calibrates the bundled reference model on the bundled corpus.
    """
    # Everything the command line alone can get wrong fails here, in one line, before the model is touched.
    check_ratios(ratios)
    if out is not None:
        check_output_dir(out, "--out")
    elif model_dir is None or model_dir.is_dir():  # a missing MODEL_DIR is reported as such by calibrate below
        check_output_dir((model_dir or _bundled_model()) / "kvcal", "the output directory (MODEL_DIR/kvcal)")
    for name, value in (("--max-tokens", max_tokens), ("--seq-len", seq_len), ("--rank-cap", rank_cap)):
        if value is not None and value < 1:
            raise click.BadParameter(f"{value} is not a positive integer", param_hint=f"'{name}'")
    for name, value in (("--sink", sink), ("--window", window)):
        if value is not None and value < 0:
            raise click.BadParameter(f"{value} must be >= 0", param_hint=f"'{name}'")

    from kvcal.calibration import calibrate as run

    report = run(
        model_dir, data=list(data) or None, recipe=recipe, out=out, device=device, progress=not as_json,
        ratios=tuple(ratios), sink=sink, window=window, max_tokens=max_tokens, seq_len=seq_len,
        pca_grouping=pca_grouping, rank_cap=rank_cap, metric=metric, budget=budget,
    )
    summary = report.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(render_calibration(summary))


def _bundled_model() -> Path:
    from kvcal.data import bundled_model

    return bundled_model()


def render_calibration(s: dict) -> str:
    lines = [
        f"kvcal artifact: {s['artifact']}",
        f"model: {s['model_type']}   tokens: {s['tokens']:,} in {s['sequences']} sequences   "
        f"grouping: {s['pca_grouping']}   time: {s['seconds']:.1f} s   overhead: {s['overhead_percent']:.2f}% of model parameters",
        "",
        f"{'ratio':>6} {'kind':>4} {'bits/token':>10} {'expected':>9} {'kept coords':>11} {'expl.var':>9}  symbol models",
    ]
    for ratio, kinds in sorted(s["ratios"].items(), key=lambda item: float(item[0])):
        for kind, groups in kinds.items():
            for g in groups:
                lines.append(f"{ratio:>6} {kind:>4} {g['bits_per_token']:>10} {g['expected_ratio']:>8.1f}x {g['kept']:>11} "
                             f"{g['explained_variance']:>9.4f}  gaussian:{g['gaussian']} laplace:{g['laplace']}")
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
