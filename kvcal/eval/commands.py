"""``kvcal eval`` and ``kvcal inspect``: click commands over ``kvcal.eval.harness`` and ``kvcal.inspect``.

User errors are ``KvcalError``s and propagate: the ``kvcal`` group prints them on one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kvcal.clitools import check_output_file, check_ratios, verbose_option, write_error


def _list_methods(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from kvcal.eval.methods import METHOD_ALIASES, method_summaries

    rows = method_summaries()
    width = max(len(name) for name, _ in rows)
    for name, summary in rows:
        click.echo(f"{name:<{width}}  {summary}")
    click.echo("aliases: " + ", ".join(f"{a} = {t}" for a, t in METHOD_ALIASES.items())
               + "; names also match ignoring case, '-', '_' and spaces")
    ctx.exit(0)


@click.command("eval")
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--artifact", type=click.Path(path_type=Path), help="Calibration artifact (default: MODEL_DIR/kvcal).")
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help="Evaluation text: .txt/.md/.rst, directories, or .jsonl with a \"text\" field (default: bundled eval corpus).")
@click.option("--ratio", "ratios", multiple=True, type=float,
              help="Target ratio for methods with a knob (repeatable; default: the artifact's ratios).")
@click.option("--method", "methods", multiple=True, help="Method to compare (repeatable; default: all; `turboquant` runs its four variants).")
@click.option("--prefix", default=768, show_default=True, help="Tokens prefilled before the continuation.")
@click.option("--continuation", default=128, show_default=True, help="Tokens scored after the prefix.")
@click.option("--sink", default=4, show_default=True, help="First tokens every method keeps exact.")
@click.option("--window", default=128, show_default=True, help="Last tokens every method keeps exact.")
@click.option("--windows", default=64, show_default=True, help="Perplexity windows.")
@click.option("--needles", default=128, show_default=True, help="Needle-probe trials (0 to skip retrieval).")
@click.option("--needle-context", default=1024, show_default=True, help="Tokens in each needle-probe context.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write every figure as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the rate–quality plot (PNG).")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
@click.option("--list-methods", is_flag=True, expose_value=False, is_eager=True, callback=_list_methods,
              help="Print every method (and family) with its one-line summary, and exit.")
@verbose_option
def eval_command(model_dir, artifact, data, ratios, methods, prefix, continuation, sink, window, windows, needles,
                 needle_context, json_path, plot_path, device, progress):
    """Rate–quality of KVTC and baselines: continuation perplexity and needle retrieval vs compression ratio.

    With no MODEL_DIR, evaluates the bundled reference model on the bundled eval corpus.
    """
    from kvcal.data import bundled_corpus, bundled_model, load_texts
    from kvcal.eval.harness import EvalSettings, evaluate
    from kvcal.eval.methods import expand_method_names
    from kvcal.models import check_model_dir, load_model

    expand_method_names(methods)  # fail on an unknown name before loading anything
    check_ratios(ratios)
    check_output_file(json_path, "--json")
    check_output_file(plot_path, "--plot")
    settings = EvalSettings(prefix=prefix, continuation=continuation, sink=sink, window=window, windows=windows,
                            needles=needles, needle_context=needle_context).validate()
    model_dir = check_model_dir(model_dir or bundled_model())
    texts = load_texts(list(data) or [bundled_corpus("eval")])
    art = find_artifact(artifact, model_dir)
    model, tokenizer = load_model(model_dir, device)
    report = evaluate(model, tokenizer, texts, methods=list(methods) or None, ratios=list(ratios) or None,
                      artifact=art, settings=settings, progress=progress, model_name=str(model_dir))
    click.echo(report.table())
    if json_path:
        _write(lambda: report.save_json(json_path), json_path, "--json")
        click.echo(f"wrote {json_path}")
    if plot_path:
        _write(lambda: report.plot(plot_path), plot_path, "--plot")
        click.echo(f"wrote {plot_path}")


def _write(write, path: Path, option: str) -> None:
    """Run ``write()``; a failure of the file system becomes one line, not a traceback."""
    try:
        write()
    except OSError as e:
        raise write_error(path, option, e) from None


def find_artifact(artifact: Path | None, model_dir: Path):
    """The artifact asked for, else the one beside the model if there is one, else None."""
    from kvcal.artifact import ARTIFACT_FILE, Artifact

    if artifact is not None:
        return Artifact.load(artifact)
    if (model_dir / "kvcal" / ARTIFACT_FILE).is_file() or (model_dir / ARTIFACT_FILE).is_file():
        return Artifact.load(model_dir)
    return None


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write bit allocations, explained variance and budgets as a PNG.")
@verbose_option
def inspect_command(path, as_json, plot_path):
    """What a calibration artifact holds: per ratio, coordinates per quantizer, bits, variance kept; budgets.

    PATH is an artifact directory or file, or a model directory holding kvcal/.
    """
    check_output_file(plot_path, "--plot")
    from kvcal.inspect import inspect_artifact

    summary = inspect_artifact(path)
    if plot_path:
        _write(lambda: summary.plot(plot_path), plot_path, "--plot")
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        click.echo(summary.text())
        if plot_path:
            click.echo(f"wrote {plot_path}")
