"""Calibration recipes: per-family defaults in ``recipes/*.toml``, overridden by command-line flags."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from kvcal.codec.quantize import QUANT_TYPES
from kvcal.errors import DataError, RatioError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


@dataclass(frozen=True)
class Recipe:
    ratios: tuple[float, ...] = (8.0, 16.0, 32.0)
    sink: int = 4
    window: int = 128
    seq_len: int = 1024
    max_tokens: int = 262_144
    heldout_every: int = 8
    heldout_tokens: int = 4096
    pca_grouping: str = "cross-layer"  # "cross-layer": one basis over all layers and heads (KVTC); or "per-layer"
    rank_cap: int | None = None
    quant_types: tuple[str, ...] = QUANT_TYPES
    group_sizes: tuple[int, ...] = (1, 16, 64, 256, 1024)
    obs_window: int = 32
    pyramid_mode: str = "attention"  # "attention" (fitted from entropy) or "arithmetic" (classic PyramidKV)
    pyramid_beta: float = 20.0
    pyramid_temperature: float = 1.0
    batch_size: int = 1
    source: str = field(default="built-in defaults", compare=False)

    def validate(self) -> Recipe:
        if not self.ratios:
            raise RatioError("no ratio given; pass at least one --ratio")
        for r in self.ratios:
            if not (r > 1.0 and r < 1e6):
                raise RatioError(f"ratio {r:g} cannot be reached: ratios must be greater than 1 (bf16 bytes / stored bytes)")
        if self.pca_grouping not in ("cross-layer", "per-layer"):
            raise DataError(f"pca_grouping must be cross-layer or per-layer, not {self.pca_grouping!r}")
        if self.pyramid_mode not in ("attention", "arithmetic"):
            raise DataError(f"pyramid_mode must be attention or arithmetic, not {self.pyramid_mode!r}")
        bad = [t for t in self.quant_types if t not in QUANT_TYPES]
        if bad or "none" not in self.quant_types:
            raise DataError(f"quant_types must be drawn from {', '.join(QUANT_TYPES)} and include none")
        if 1 not in self.group_sizes or any(g < 1 for g in self.group_sizes):
            raise DataError("group_sizes must be positive and include 1")
        if self.sink < 0 or self.window < 0:
            raise DataError("sink and window must be >= 0")
        if self.seq_len < self.sink + self.obs_window + 16:
            raise DataError(
                f"seq_len {self.seq_len} is too short: it must exceed sink ({self.sink}) + obs_window ({self.obs_window}) + 16"
            )
        return self


def load_recipe(path: str | Path | None = None, model_type: str | None = None, **overrides) -> Recipe:
    """The recipe at ``path``, else ``recipes/<model_type>.toml`` if present, else defaults; then ``overrides``."""
    fields = {f.name for f in dataclasses.fields(Recipe)}
    values: dict = {}
    source = "built-in defaults"
    candidate = Path(path) if path else (RECIPES_DIR / f"{model_type}.toml" if model_type else None)
    if path and not candidate.is_file():
        raise DataError(f"recipe {path} does not exist; pass a TOML file such as recipes/llama.toml")
    if candidate is not None and candidate.is_file():
        try:
            doc = tomllib.loads(candidate.read_text())
        except tomllib.TOMLDecodeError as e:
            raise DataError(f"recipe {candidate} is not valid TOML ({e})") from None
        flat = {**doc.get("calibration", {}), **{f"pyramid_{k}": v for k, v in doc.get("pyramid", {}).items()}}
        unknown = sorted(set(flat) - fields)
        if unknown:
            raise DataError(f"recipe {candidate} has unknown keys {', '.join(unknown)}")
        values.update(flat)
        # Shipped recipes are named relative to the repository, so artifacts do not depend on where it lives.
        source = f"recipes/{candidate.name}" if candidate.resolve().parent == RECIPES_DIR else str(candidate)
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    for key in ("ratios", "quant_types", "group_sizes"):
        if key in values:
            values[key] = tuple(values[key])
    if "ratios" in values:
        values["ratios"] = tuple(float(r) for r in values["ratios"])
    return Recipe(**values, source=source).validate()
