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
from kvcal.eval.methods.turboquant import TurboQuant25, TurboQuant35, TurboQuantProd25, TurboQuantProd35

METHODS: dict[str, type[CacheMethod]] = {
    cls.name: cls
    for cls in (Uncompressed, Fp8PerToken, Int8PerToken, Int4PerToken, Kivi2, TurboQuant25, TurboQuant35, TurboQuantProd25,
                TurboQuantProd35, PcaTruncation,
                StreamingLLM, SnapKV, H2O, PyramidKV, Kvtc, KvtcPyramidKV)
}


# A family name stands for all of its members: `--method turboquant` runs the paper's bit widths, with and without QJL.
METHOD_FAMILIES: dict[str, tuple[str, ...]] = {
    "turboquant": (TurboQuant25.name, TurboQuant35.name, TurboQuantProd25.name, TurboQuantProd35.name)}


# Other spellings users type (the seed's names among them); anything else is matched ignoring case, '-', '_' and spaces,
# so `turboquant2.5`, `streaming-llm`, `pyramid-kv` and `snap_kv` work too.
METHOD_ALIASES: dict[str, str] = {"kivi": Kivi2.name}


class UnknownMethodError(KvcalError):
    """A method name that is not in the registry."""


def method_names() -> list[str]:
    return list(METHODS)


def _squash(name: str) -> str:
    return "".join(c for c in name.lower() if c not in "-_ ")


def canonical_method_name(name: str) -> str:
    """The registered method or family ``name`` stands for (aliases and loose spellings resolved), else ``name``."""
    if name in METHODS or name in METHOD_FAMILIES:
        return name
    known = {_squash(n): n for n in (*METHODS, *METHOD_FAMILIES)}
    known.update({_squash(a): target for a, target in METHOD_ALIASES.items()})
    return known.get(_squash(name), name)


def method_summaries() -> list[tuple[str, str]]:
    """``(name, one-line summary)`` of every method, then of every family, in registry order."""
    rows = [(name, cls.summary) for name, cls in METHODS.items()]
    rows += [(fam, "all of: " + ", ".join(members)) for fam, members in METHOD_FAMILIES.items()]
    return rows


def expand_method_names(names) -> list[str]:
    """``names`` with every family replaced by its members, duplicates dropped, order kept; unknown names raise."""
    out: list[str] = []
    for name in map(canonical_method_name, names):
        for member in METHOD_FAMILIES.get(name, (name,)):
            get_method(member)
            out.append(member)
    return list(dict.fromkeys(out))


def get_method(name: str) -> CacheMethod:
    """The method registered as ``name``, with its default settings."""
    cls = METHODS.get(canonical_method_name(name))
    if cls is None:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join([*METHODS, *METHOD_FAMILIES])}")
    return cls()


__all__ = ["METHODS", "METHOD_ALIASES", "METHOD_FAMILIES", "CacheMethod", "MethodContext", "MethodOutput", "Prefilled", "UnknownMethodError",
           "canonical_method_name", "expand_method_names", "get_method", "method_names", "method_summaries"]
