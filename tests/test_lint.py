"""The code passes the project's lint: ruff with the rules chosen in pyproject.toml (pyflakes'
unused and undefined names, pycodestyle, import order, bugbear's traps, pyupgrade, no stale noqa)
over the package, its tests and its benchmarks."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from scaffold import ROOT


def test_ruff_finds_nothing() -> None:
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it comes with the test extra: pip install -e '.[test]')")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-1000:]
