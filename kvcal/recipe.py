"""Calibration recipes: per-family defaults in ``kvcal/recipes/*.toml``, overridden by command-line flags.

The shipped recipes are package data, read through ``importlib.resources``, so an installed (not editable) kvcal
has them too. A family kvcal supports must have one: a missing recipe is an error, never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from kvcal.errors import DataError, RatioError

RECIPES_PACKAGE = "kvcal"
RECIPES_SUBDIR = "recipes"
RECIPES_DIR = Path(__file__).resolve().parent / RECIPES_SUBDIR  # where they are in a regular (file system) install


def shipped_recipe(model_type: str):
    """The packaged recipe for ``model_type`` (an ``importlib.resources`` Traversable), or None."""
    res = resources.files(RECIPES_PACKAGE) / RECIPES_SUBDIR / f"{model_type}.toml"
    return res if res.is_file() else None


def shipped_recipe_names() -> list[str]:
    folder = resources.files(RECIPES_PACKAGE) / RECIPES_SUBDIR
    return sorted(r.name[: -len(".toml")] for r in folder.iterdir() if r.name.endswith(".toml")) if folder.is_dir() else []


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
    metric: str = "attention"  # "attention": errors as attention output sees them (kvcal.fit.metric); "mse": plain
    budget: str = "joint"  # "joint": keys and values share one bit budget; "split": each gets its share
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
        if self.metric not in ("attention", "mse"):
            raise DataError(f"metric must be attention or mse, not {self.metric!r}")
        if self.budget not in ("joint", "split"):
            raise DataError(f"budget must be joint or split, not {self.budget!r}")
        if self.sink < 0 or self.window < 0:
            raise DataError("sink and window must be >= 0")
        if self.seq_len < self.sink + self.obs_window + 16:
            raise DataError(
                f"seq_len {self.seq_len} is too short: it must exceed sink ({self.sink}) + obs_window ({self.obs_window}) + 16"
            )
        return self


def load_recipe(path: str | Path | None = None, model_type: str | None = None, **overrides) -> Recipe:
    """The recipe at ``path``, else the shipped ``recipes/<model_type>.toml``, else defaults; then ``overrides``.

    Defaults are used only for a model type kvcal has no adapter for; a supported family whose shipped recipe
    cannot be found (a broken install) raises ``DataError``.
    """
    fields = {f.name for f in dataclasses.fields(Recipe)}
    values: dict = {}
    source = "built-in defaults"
    text = name = None
    if path:
        candidate = Path(path)
        if not candidate.is_file():
            raise DataError(f"recipe {path} does not exist; pass a TOML file such as kvcal/recipes/llama.toml")
        text, name = candidate.read_text(), str(candidate)
    elif model_type:
        res = shipped_recipe(model_type)
        if res is not None:
            # Shipped recipes are named relative to the package, so artifacts do not depend on where it lives.
            text, name = res.read_text(encoding="utf-8"), f"recipes/{model_type}.toml"
        elif _is_supported(model_type):
            raise DataError(
                f"kvcal's recipe for {model_type} (kvcal/recipes/{model_type}.toml) is missing from this install; "
                "reinstall kvcal or pass --recipe FILE"
            )
    if text is not None:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise DataError(f"recipe {name} is not valid TOML ({e})") from None
        flat = {**doc.get("calibration", {}), **{f"pyramid_{k}": v for k, v in doc.get("pyramid", {}).items()}}
        unknown = sorted(set(flat) - fields)
        if unknown:
            raise DataError(f"recipe {name} has unknown keys {', '.join(unknown)}")
        values.update(flat)
        source = name if not path or Path(path).resolve().parent != RECIPES_DIR else f"recipes/{Path(path).name}"
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    for key in ("ratios",):
        if key in values:
            values[key] = tuple(values[key])
    if "ratios" in values:
        values["ratios"] = tuple(float(r) for r in values["ratios"])
    return Recipe(**values, source=source).validate()


def _is_supported(model_type: str) -> bool:
    from kvcal.adapters import ADAPTERS

    return model_type in ADAPTERS
