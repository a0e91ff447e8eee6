"""A peer's own Python environment for side-by-side benchmarks (kvpress, LMCache).

Peers pin versions kvcal's base install must not take (kvpress: transformers < 5.3; LMCache: numpy <= 2.2.6), so
each bench runs the peer in a venv of its own, created once and reused while a probe says it is still right.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def ensure_peer_venv(venv: Path, probe_code: str, requirements: list[str], what: str) -> Path:
    """The python of ``venv``, after creating it and installing ``requirements`` there unless ``probe_code`` (run by
    that python) already succeeds. The torch of this environment goes in first, at the same version: a bare
    requirement would pull a multi-GB CUDA build on a CPU machine."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", probe_code]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    import torch

    print(f"creating {venv} with {what} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run([*pip, *requirements], check=True)
    subprocess.run(probe, check=True)
    return py
