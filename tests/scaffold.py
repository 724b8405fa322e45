"""What the tests share beyond fixtures: writing search-space files and running commands as users do."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
# Reports at exit whether the command imported Ray (commands validate before they import it).
_PROBE = ("import atexit, runpy, sys; "
          "atexit.register(lambda: print('ray imported' if 'ray' in sys.modules else 'ray not imported')); "
          "module = sys.argv.pop(1); sys.argv[0] = module; runpy.run_module(module, run_name='__main__')")


def write_space(path: Path, space: dict[str, Any] | str) -> Path:
    """Write a search-space file: a mapping as YAML, or YAML text as given (dedented)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space, sort_keys=False) if isinstance(space, dict) else textwrap.dedent(space))
    return path


def tiny_space(name: str, data: Path | str, models: list[dict], matrix: list[dict] | None = None, *,
               epochs: int = 1, width: float = 0.125, **top: Any) -> dict[str, Any]:
    """A search space of width-0.125 ResNet-18s on ``data`` (a folder), quick recipe, one CPU per trial."""
    return {"name": name, "data": f"folder:{data}", **top,
            "recipe": {"name": "quick", "epochs": epochs, "batch_size": 32},
            "resources": {"cpus_per_trial": 1, "max_failures": 2},
            "models": [{"arch": "resnet18", "width": width, **m} for m in models], "matrix": matrix or []}


def probe_command(module: str, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m MODULE ARGS`` started in ``cwd`` with this checkout on the path; its stdout
    ends with ``ray imported`` or ``ray not imported``."""
    return subprocess.Popen([sys.executable, "-c", _PROBE, module, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def run_command(module: str, *args: str, cwd: Path = ROOT, timeout: float = 600,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``probe_command``, run to its end."""
    proc = probe_command(module, *args, cwd=cwd, env=env)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def start_command(module: str, *args: str, cwd: Path = ROOT) -> subprocess.Popen:
    """``python -m MODULE ARGS`` started in ``cwd``, output piped, for tests that interrupt it."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
