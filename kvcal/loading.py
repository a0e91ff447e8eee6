"""``kvcal.load``: find the artifact beside a model, check it belongs to the model, and build the codec."""

from __future__ import annotations

from pathlib import Path

from kvcal.adapters import adapter_for, adapter_for_config
from kvcal.artifact import Artifact
from kvcal.codec.entropy import DEFAULT_ENTROPY
from kvcal.codec.kvtc import KVTCCodec
from kvcal.errors import ArtifactError


def load(path: str | Path, ratio: float | None = None, model=None, sink: int | None = None, window: int | None = None,
         entropy: str = DEFAULT_ENTROPY, zstd_level: int = 3, kernels: str = "auto", device=None) -> KVTCCodec:
    """A codec for ``path`` (a model directory holding ``kvcal/`` or an artifact directory/file).

    With ``model``, the artifact's fingerprint is checked against it (a mismatch names the fields that differ)
    and RoPE comes from the model itself; without it, RoPE is rebuilt from the model's config.
    ``ratio`` defaults to the smallest ratio in the artifact (the highest quality). ``entropy`` picks the entropy
    stage: ``"rans"`` (kvcal's rANS under the calibrated symbol models, the default), ``"ans"`` (the same models
    through ``constriction``, slower to decode) or ``"zstd"`` (for comparison). ``kernels``: ``"auto"``
    (the fused Triton kernels for CUDA caches when ``kvcal[triton]`` is installed), ``"triton"`` or ``"torch"``.
    ``device`` places the codec's projections and steps there up front (otherwise on first use).
    """
    artifact = Artifact.load(path)
    if model is not None:
        adapter = adapter_for(model)
        artifact.check_model(model, adapter.layout())
    else:
        adapter = adapter_for_config(_config_for(Path(path), artifact))
    return KVTCCodec(artifact, min(artifact.ratios) if ratio is None else ratio, adapter, sink, window, entropy, zstd_level,
                     kernels=kernels, device=device)


def _config_for(path: Path, artifact: Artifact):
    from transformers import AutoConfig

    art_file = artifact.path
    for candidate in (path, path.parent, art_file.parent.parent if art_file else None):
        if candidate is not None and (candidate / "config.json").is_file():
            config = AutoConfig.from_pretrained(candidate, local_files_only=True)
            if config.get_text_config(decoder=True).model_type != artifact.fingerprint["model_type"]:
                raise ArtifactError(f"artifact was made for a {artifact.fingerprint['model_type']} model, "
                                    f"but {candidate} holds a {config.model_type}; pass the matching model")
            return config
    raise ArtifactError(f"no config.json beside the artifact at {path}; pass model= to kvcal.load")
