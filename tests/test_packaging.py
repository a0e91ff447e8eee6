"""Installed, not editable: recipes ship as package data; the bundled models and corpora are found from a clone only,
and their absence is one line saying where they live, never a silent fallback."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvcal import recipe as recipe_mod
from kvcal.adapters import ADAPTERS
from kvcal.cli import main
from kvcal.data import bundled_corpus, bundled_model
from kvcal.errors import DataError, ModelError
from kvcal.recipe import load_recipe, shipped_recipe, shipped_recipe_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_every_family_has_a_packaged_recipe_with_its_real_ratios(family):
    res = shipped_recipe(family)
    assert res is not None, f"no kvcal/recipes/{family}.toml"
    doc = tomllib.loads(res.read_text(encoding="utf-8"))
    r = load_recipe(None, family)
    assert r.source == f"recipes/{family}.toml"
    assert r.ratios == tuple(float(x) for x in doc["calibration"]["ratios"])
    assert family in shipped_recipe_names()


def test_a_missing_recipe_of_a_supported_family_is_an_error(monkeypatch):
    monkeypatch.setattr(recipe_mod, "shipped_recipe", lambda model_type: None)
    with pytest.raises(DataError, match="recipe for llama .* is missing from this install"):
        load_recipe(None, "llama")
    assert load_recipe(None, "no-such-family").source == "built-in defaults"  # unsupported: defaults, as documented


def test_missing_bundled_data_says_where_it_lives(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCAL_ARTIFACTS", str(tmp_path))
    with pytest.raises(ModelError, match=r"artifacts/kvcal-ref-llama; install from a clone with pip install -e \."):
        bundled_model()
    with pytest.raises(DataError, match=r"artifacts/corpus/calib.jsonl; .*or pass --data"):
        bundled_corpus("calib")
    for args in (["calibrate"], ["eval"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and res.output.count("\n") == 1 and "pip install -e ." in res.output, res.output


def test_bundled_data_found_in_a_clone():
    assert (bundled_model() / "config.json").is_file()
    assert bundled_corpus("eval").is_file()


def test_wheel_ships_recipes_not_artifacts_and_works_installed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "kvcal", src / "kvcal", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("kvcal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"kvcal/recipes/{f}.toml" for f in ADAPTERS} <= set(names)
    assert not [n for n in names if "artifacts/" in n or n.endswith((".safetensors", ".jsonl"))]

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    probe = (
        "import kvcal, kvcal.recipe as r, kvcal.data as d\n"
        f"assert kvcal.__file__.startswith({str(site)!r}), kvcal.__file__\n"
        "print(r.load_recipe(None, 'llama').ratios)\n"
        "try:\n    d.bundled_model()\nexcept kvcal.ModelError as e:\n    print('ModelError', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("KVCAL_ARTIFACTS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    shipped = tomllib.loads((ROOT / "kvcal" / "recipes" / "llama.toml").read_text())["calibration"]["ratios"]
    assert str(tuple(float(r) for r in shipped)) in out.stdout  # the recipe's own ratios, not the 8/16/32 defaults
    assert "ModelError the bundled reference model" in out.stdout and "pip install -e ." in out.stdout
