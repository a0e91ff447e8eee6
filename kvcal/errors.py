"""kvcal's user-facing errors: each carries one line saying what is wrong and what to do."""

from __future__ import annotations


class KvcalError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero, without a traceback.

    ``detail`` (optional) is the long form (hashes, every value), printed by the CLI only with ``--verbose``.
    """

    def __init__(self, *args, detail: str | None = None):
        super().__init__(*args)
        self.detail = detail


class ModelError(KvcalError):
    """The model directory is missing, not a causal LM, or of an architecture kvcal has no adapter for."""


class DataError(KvcalError):
    """Calibration or evaluation data is missing, empty or too short."""


class ArtifactError(KvcalError):
    """A calibration artifact is missing, corrupt, or was made for another model."""


class RatioError(KvcalError):
    """A requested compression ratio cannot be reached or is not in the artifact."""


class BitstreamError(KvcalError):
    """A compressed blob is truncated, corrupted, foreign or hostile."""
