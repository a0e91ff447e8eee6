"""Cache methods compared by ``kvcal eval``, registered by name.

Each method is a small frozen dataclass (its fields are its settings) with ``apply(prefilled, ctx, ratio)``
returning the cache to continue from and the bytes it stores for the middle tokens.
"""

from __future__ import annotations

from kvcal.errors import KvcalError
from kvcal.eval.methods.base import CacheMethod, MethodContext, MethodOutput, Prefilled
from kvcal.eval.methods.eviction import H2O, PyramidKV, SnapKV, StreamingLLM
from kvcal.eval.methods.quantized import Fp8PerToken, Int4PerToken, Int8PerToken, Kivi2, Uncompressed
from kvcal.eval.methods.transform import Kvtc, KvtcPyramidKV, PcaTruncation
from kvcal.eval.methods.turboquant import TurboQuant25, TurboQuant35

METHODS: dict[str, type[CacheMethod]] = {
    cls.name: cls
    for cls in (Uncompressed, Fp8PerToken, Int8PerToken, Int4PerToken, Kivi2, TurboQuant25, TurboQuant35, PcaTruncation,
                StreamingLLM, SnapKV, H2O, PyramidKV, Kvtc, KvtcPyramidKV)
}


class UnknownMethodError(KvcalError):
    """A method name that is not in the registry."""


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> CacheMethod:
    """The method registered as ``name``, with its default settings."""
    cls = METHODS.get(name)
    if cls is None:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return cls()


__all__ = ["METHODS", "CacheMethod", "MethodContext", "MethodOutput", "Prefilled", "UnknownMethodError",
           "get_method", "method_names"]
