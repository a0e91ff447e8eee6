"""kvcal: offline calibration and KV-cache transform coding (KVTC) for Hugging Face causal LMs."""

__version__ = "0.1.0"

from kvcal.errors import ArtifactError, BitstreamError, DataError, KvcalError, ModelError, RatioError  # noqa: E402

_LAZY = {"calibrate": "kvcal.calibration", "load": "kvcal.loading", "KVTCCodec": "kvcal.codec.kvtc",
         "Artifact": "kvcal.artifact", "KVTCCache": "kvcal.cache"}


def __getattr__(name: str):
    # Heavy modules (transformers) load on first use, so `import kvcal` and `kvcal --help` stay fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvcal' has no attribute {name!r}")


__all__ = ["calibrate", "load", "KVTCCodec", "Artifact", "KVTCCache", "__version__", "KvcalError", "ModelError", "DataError", "ArtifactError", "RatioError", "BitstreamError"]
