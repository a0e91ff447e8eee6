"""Recipes: per-family TOML defaults, overridden by flags, validated with one-line errors."""

import pytest

from kvcal.errors import DataError, RatioError
from kvcal.recipe import RECIPES_DIR, Recipe, load_recipe


def test_family_recipe_then_overrides():
    r = load_recipe(None, "llama")
    import tomllib

    shipped = tomllib.loads((RECIPES_DIR / "llama.toml").read_text())["calibration"]["ratios"]
    assert r.source == "recipes/llama.toml" and r.ratios == tuple(float(x) for x in shipped)
    r = load_recipe(None, "llama", ratios=(4,), window=64, sink=None)
    assert r.ratios == (4.0,) and r.window == 64 and r.sink == 4


def test_every_shipped_recipe_is_valid():
    for path in RECIPES_DIR.glob("*.toml"):
        assert isinstance(load_recipe(path), Recipe)


def test_unknown_family_uses_defaults():
    assert load_recipe(None, "no-such-family").source == "built-in defaults"


def test_bad_recipes(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[calibration]\nratioz = [4]\n")
    with pytest.raises(DataError, match="unknown keys ratioz"):
        load_recipe(bad)
    bad.write_text("[calibration\n")
    with pytest.raises(DataError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(RatioError):
        load_recipe(None, None, ratios=(1.0,))
    with pytest.raises(DataError, match="too short"):
        load_recipe(None, None, seq_len=20)
