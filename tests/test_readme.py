"""README as a new user reads it: its two commands are what CI runs, and every Python block runs as written."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The calibration budget the README snippets get here (the recipe's 262k tokens take a minute on a CPU).
SMALL_CALIBRATION = dict(max_tokens=256 * 12, seq_len=256, heldout_tokens=1024)


def readme_command(marker: str) -> str:
    """The ```bash block right after ``<!-- marker -->``, the same rule as .ci/run's ``readme_command``."""
    m = re.search(rf"^<!-- {marker} -->\n```bash\n(.*?)^```", README, re.S | re.M)
    assert m, f"README.md has no ```bash block after <!-- {marker} -->"
    return m.group(1).strip()


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)


def test_ci_runs_exactly_readmes_two_commands():
    main_cmd, test_cmd = readme_command("main-command"), readme_command("test-command")
    res = subprocess.run(["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KVCAL_CI_DRY_RUN": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"main: {main_cmd}", f"test: {test_cmd}"]
    # Nothing else is installed in README's venv (bar the CPU torch wheel), so README's main command must bring
    # pytest. The optional-extra stage comes after the test command, in a venv of its own.
    script = (ROOT / ".ci" / "run").read_text()
    installs = [line.strip() for line in script.splitlines() if "pip install" in line and not line.strip().startswith(("#", "echo"))]
    readme_venv = [line for line in installs if "$EXTRA_VENV" not in line]
    assert readme_venv and all("torch==" in line or "--upgrade pip" in line for line in readme_venv), readme_venv
    assert script.index('bash -euo pipefail -c "$MAIN_CMD"') < script.index('bash -c "$TEST_CMD"')
    extra = [line for line in installs if "$EXTRA_VENV" in line]
    assert all(script.index(line) > script.index('bash -c "$TEST_CMD"') for line in extra)
    assert any(".[lmcache,dev]" in line for line in extra), extra


def test_main_command_installs_what_the_test_command_needs():
    main_cmd, test_cmd = readme_command("main-command"), readme_command("test-command")
    assert "pytest" in test_cmd
    m = re.search(r'pip install (?:-e )?"?\.\[([a-z,]+)\]"?', main_cmd)
    assert m, main_cmd
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = " ".join(" ".join(extras[e]) for e in m.group(1).split(","))
    for need in ("pytest", "matplotlib"):
        assert need in wanted, f"README's main command does not install {need}"


def test_cpu_torch_alternative_is_shown():
    assert "--index-url https://download.pytorch.org/whl/cpu" in README


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    import kvcal
    import kvcal.calibration
    from kvcal.recipe import Recipe

    blocks = python_blocks()
    assert blocks, "README.md has no ```python block"
    # Relative paths in the snippets resolve as from a clone's root; whatever they write lands in tmp_path.
    (tmp_path / "artifacts").symlink_to(ROOT / "artifacts")
    monkeypatch.chdir(tmp_path)
    fields = {f.name for f in dataclasses.fields(Recipe)}
    small = {k: v for k, v in SMALL_CALIBRATION.items() if k in fields}

    def calibrate(*args, **kwargs):
        out = kwargs.get("out")
        assert out is not None and not Path(out).resolve().is_relative_to(ROOT), "README calibrates into the repository"
        return kvcal.calibration.calibrate(*args, **{**small, **kwargs, "progress": False})

    monkeypatch.setattr(kvcal, "calibrate", calibrate, raising=False)
    shipped = {p: p.stat().st_mtime_ns for p in (ROOT / "artifacts").rglob("kvcal.*")}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "artifacts").rglob("kvcal.*")} == shipped


@pytest.mark.parametrize("marker", ["main-command", "test-command"])
def test_each_marker_has_one_block(marker):
    assert README.count(f"<!-- {marker} -->") == 1
