"""The code base stays ruff clean and the package type-checks with mypy (settings in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    r = subprocess.run([ruff, "check", "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_mypy_clean() -> None:
    beside = Path(sys.executable).parent / "mypy"  # the project's own (pinned) mypy first
    mypy = str(beside) if beside.exists() else shutil.which("mypy")
    if mypy is None:
        pytest.fail("mypy is not installed: pip install -e '.[dev]'")
    # --python-executable: resolve the package's dependencies in the environment running the tests
    r = subprocess.run([mypy, "--python-executable", sys.executable], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
