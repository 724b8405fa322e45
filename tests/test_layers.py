"""The layers' import rules: values at the bottom, Ray only in ``rm_sweep.orchestration``, commands
that start nothing until they have validated their input."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from scaffold import ROOT

PACKAGE = ROOT / "rm_sweep"
COMMANDS = ["rm_sweep.train", "rm_sweep.sweep", "rm_sweep.matrix", "rm_sweep.tradeoff", "rm_sweep.query",
            "rm_sweep.__main__", "rm_sweep.report"]
# The value layer: what a search space is made of, and its validation.
VALUES = ["rm_sweep.checks", "rm_sweep.recipes", "rm_sweep.spec", "rm_sweep.spaces", "rm_sweep.space_parser"]
TRAINING_AND_STORAGE = ["rm_sweep.train", "rm_sweep.data", "rm_sweep.store", "rm_sweep.tables", "rm_sweep.pipeline",
                        "pyarrow", "ray"]


def imported_modules(tree: ast.AST) -> set[str]:
    """Every module a source file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def modules_after_import(*modules: str, run: str = "") -> set[str]:
    """``sys.modules`` of a fresh interpreter after importing ``modules`` (and running ``run``)."""
    code = "\n".join(["import sys", *(f"import {m}" for m in modules), run, "print(' '.join(sys.modules))"])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


def _ray_imports(path: Path) -> list[str]:
    return sorted(m for m in imported_modules(ast.parse(path.read_text())) if m == "ray" or m.startswith("ray."))


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p.parent.name != "orchestration"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_orchestration_package_imports_ray(path: Path) -> None:
    uses_ray = _ray_imports(path)
    assert not uses_ray, f"{path.relative_to(ROOT)} imports {uses_ray}: Ray belongs in rm_sweep/orchestration/"


def test_the_orchestration_package_is_where_ray_is_used() -> None:
    # The rule above is only meaningful if the parser finds Ray where it is imported.
    assert _ray_imports(PACKAGE / "orchestration" / "trials.py")


def test_the_value_layer_imports_no_training_code_storage_or_ray() -> None:
    loaded = modules_after_import(*VALUES, run="import rm_sweep.spaces as s; s.load_space('search_spaces/table2.yaml')")
    assert not loaded & set(TRAINING_AND_STORAGE), loaded & set(TRAINING_AND_STORAGE)


def test_checks_and_recipes_do_not_even_import_torch() -> None:
    assert "torch" not in modules_after_import("rm_sweep.checks", "rm_sweep.recipes")


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_import_no_ray_at_module_level(command: str) -> None:
    assert "ray" not in modules_after_import(command)


def test_no_module_is_longer_than_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
