"""What every ``kvcal`` command shares: ``--verbose``, and argument checks that run before any work.

Kept apart from ``kvcal.cli`` so ``kvcal.eval.commands`` can use it without a circular import.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from kvcal.errors import KvcalError, RatioError

VERBOSE_KEY = "kvcal.verbose"


class OutputError(KvcalError):
    """An output path (``--out``, ``--json``, ``--plot``) cannot be written."""


def _set_verbose(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        ctx.meta[VERBOSE_KEY] = True  # ``meta`` is shared by the whole context chain, so the group sees it
    return value


def verbose_option(f):
    """``--verbose``: on an error, also print its long form (e.g. the fingerprint values that differ)."""
    return click.option("--verbose", "-v", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbose,
                        help="On an error, also print its details (e.g. the fingerprint hashes that differ).")(f)


def is_verbose(ctx: click.Context | None) -> bool:
    return bool(ctx is not None and ctx.meta.get(VERBOSE_KEY))


def check_ratios(ratios, option: str = "--ratio") -> tuple[float, ...]:
    """Every ratio finite and greater than 1 (bf16 bytes / stored bytes), else one line naming the bad one."""
    for r in ratios:
        if not math.isfinite(r) or r <= 1.0:
            raise RatioError(f"{option} {r:g} is not a compression ratio: ratios must be finite numbers greater than 1 "
                             "(bf16 bytes / stored bytes)")
    return tuple(ratios)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, option: str) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable directory (we mkdir the rest)."""
    anc = _nearest_existing(path.absolute().parent)
    if not anc.is_dir():
        raise OutputError(f"{option} {path}: {anc} is not a directory; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: cannot create it in {anc} (permission denied); choose a writable path")


def check_output_file(path: Path | None, option: str) -> None:
    """Fail in one line, before any work, when the file ``path`` cannot be written."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputError(f"{option} {path} is not writable (permission denied); choose a writable path")
        return
    _check_creatable(path, option)


def check_output_dir(path: Path, option: str) -> None:
    """Fail in one line, before any work, when files cannot be created in the directory ``path``."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{option} {path} is not a directory; choose a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{option} {path} is not writable (permission denied); choose a writable directory")
        return
    _check_creatable(path, option)


def write_error(path: Path, option: str, err: OSError) -> OutputError:
    """The one-line error for an output that failed while being written (e.g. the disk filled up)."""
    return OutputError(f"cannot write {option} {path}: {err.strerror or err}; choose a writable path")
