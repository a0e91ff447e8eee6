"""Post-RoPE key frame: code keys as the cache holds them (rotated), with a basis calibrated on rotated keys.

A serving cache (LMCache, vLLM's paged cache) stores keys after RoPE, and a stored chunk does not say at which
positions its tokens sat. kvcal's default codec un-rotates keys at their true positions, so it needs them; this
module is the alternative that does not: a ``PostRopeAdapter`` wraps a model's adapter and makes key un-rotation
the identity, so calibration captures rotated keys and the codec codes them as they are. Queries keep their real
rotation, so the attention-aware metric weighs a rotated key's error by the energy of rotated queries (averaged
over query positions, as the capture already does for pre-RoPE keys). Values carry no RoPE and are unchanged.

``calibrate_post_rope`` writes such an artifact and marks it (``calibration.key_frame = "post-rope"``), so a codec
can tell which frame an artifact codes and refuse the other.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from kvcal.adapters import ModelAdapter
from kvcal.errors import ArtifactError, ModelError

PRE_ROPE = "pre-rope"
POST_ROPE = "post-rope"
KEY_FRAMES = (PRE_ROPE, POST_ROPE)


def key_frame(artifact) -> str:
    """The key frame an artifact was calibrated in (artifacts without the mark are pre-RoPE, kvcal's default)."""
    frame = artifact.meta.get("calibration", {}).get("key_frame", PRE_ROPE)
    if frame not in KEY_FRAMES:
        raise ArtifactError(f"artifact names an unknown key frame {str(frame)[:40]!r}; recalibrate")
    return frame


class PostRopeAdapter:
    """A model adapter whose keys stay rotated: ``position_free``/``at_positions`` leave keys as cached.

    Everything else (layout, queries and their rotation, ``o_proj``) is the wrapped adapter's.
    """

    key_frame = POST_ROPE

    def __init__(self, inner: ModelAdapter):
        if not getattr(inner, "supports_attention_metric", True) or type(inner).unrotate_values is not ModelAdapter.unrotate_values:
            raise ModelError(f"the post-RoPE key frame supports standard attention only, not {type(inner).__name__}")
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def unrotate_keys(self, keys: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        return keys.float()

    def rotate_keys(self, keys: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        return keys.float()

    def position_free(self, kind: str, x: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        return x.float() if kind == "k" else self.inner.position_free(kind, x, layer_idx, positions)

    def at_positions(self, kind: str, x: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        return x.float() if kind == "k" else self.inner.at_positions(kind, x, layer_idx, positions)

    def rotate_queries(self, queries: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        return self.inner.rotate_queries(queries, layer_idx, positions)


@contextmanager
def _post_rope_capture():
    """Calibration with every adapter wrapped in ``PostRopeAdapter`` (``kvcal.calibration`` builds its own)."""
    import kvcal.calibration as calibration

    original = calibration.adapter_for
    calibration.adapter_for = lambda model: PostRopeAdapter(original(model))
    try:
        yield
    finally:
        calibration.adapter_for = original


def calibrate_post_rope(model_dir: str | Path, out: str | Path, **kwargs):
    """``kvcal.calibrate`` in the post-RoPE key frame; the artifact at ``out`` is marked ``key_frame = post-rope``."""
    from kvcal.artifact import Artifact
    from kvcal.calibration import calibrate

    with _post_rope_capture():
        report = calibrate(model_dir, out=out, **kwargs)
    artifact = Artifact.load(report.path)
    artifact.meta["calibration"]["key_frame"] = POST_ROPE
    artifact.save(Path(out))
    return Artifact.load(Path(out))
