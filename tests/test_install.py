"""rm_sweep installs like a package: pip builds it (not editable) into a fresh virtual environment,
and its ``rm-sweep`` runs from another directory with that installed copy, the packaged search
spaces included, the checkout nowhere on the path.

torch, Ray and the rest are not installed again (gigabytes): the new environment sees this
interpreter's site-packages through a ``.pth`` file, after its own, so the installed rm_sweep is
the one imported.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from rm_sweep.spaces import load_space

from scaffold import ROOT

pytestmark = pytest.mark.slow


def _checkout_files(destination: Path) -> Path:
    """Copy the checkout's files (tracked, and untracked ones git does not ignore; symlinks as
    links) to ``destination``: pip builds there, leaving nothing in the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, destination / name
        if source.is_symlink() or source.is_file():  # a tracked file deleted in the work tree is left out
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
    return destination


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with rm_sweep installed from a copy of the checkout, not editable."""
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "outer_site_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    source = _checkout_files(root / "source")
    # This interpreter's pip installs into the venv (--python); setuptools comes through the .pth.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-build-isolation", "--no-index", "--ignore-installed", "--quiet", str(source)],
                   check=True, timeout=600, env=_outside_env())
    return venv


def _outside_env() -> dict[str, str]:
    """This environment without PYTHONPATH, which may name the checkout."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=_outside_env(),
                          capture_output=True, text=True, timeout=600)


def test_the_installed_copy_is_what_runs(venv: Path, tmp_path: Path) -> None:
    done = _run(venv, "python", "-c", "import rm_sweep, rm_sweep.spaces as s; print(rm_sweep.__file__); "
                                      "print(*s.packaged_spaces())", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    module, spaces = done.stdout.splitlines()
    assert Path(module).resolve().is_relative_to(venv.resolve()) and not Path(module).resolve().is_relative_to(ROOT)
    assert {"quick", "fig14", "table2"} <= set(spaces.split())
    assert (venv / "bin" / "rm-sweep").read_text().splitlines()[0] == f"#!{venv / 'bin' / 'python'}"


def test_rm_sweep_help_and_a_dry_run_from_another_directory(venv: Path, tmp_path: Path, cifar_folder: Path) -> None:
    done = _run(venv, "rm-sweep", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert all(f"  {name} " in done.stdout for name in ("train", "sweep", "matrix", "tradeoff", "query", "report"))
    store = tmp_path / "store"
    done = _run(venv, "rm-sweep", "tradeoff", "--dry-run", "--data", f"folder:{cifar_folder}", "--store", str(store),
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    quick = load_space(ROOT / "rm_sweep" / "search_spaces" / "quick.yaml", data=f"folder:{cifar_folder}")
    models, cells = len(quick.models()), len(quick.cells)
    assert done.stdout.startswith(f"quick: 0 of {models} models and 0 of {cells} matrix cells in {store}")
    assert done.stdout.count(" missing") == models + cells
    assert all(spec.model_id in done.stdout for spec in quick.models())
    assert not store.exists() and not (tmp_path / "fig14.png").exists()  # a dry run writes nothing
