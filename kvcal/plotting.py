"""What every kvcal figure shares: a headless backend and an atomic-enough save into a fresh folder."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a one-line error saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        from kvcal.errors import KvcalError

        raise KvcalError("plots need matplotlib: pip install 'kvcal[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # "tight" grows the saved area to every artist, so a figure-level legend below the axes is never cut off.
    fig.savefig(out, dpi=110, bbox_inches="tight", pad_inches=0.1)
    fig.clf()
    pyplot().close(fig)
    return out
