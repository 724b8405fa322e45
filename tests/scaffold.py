"""What the tests share beyond fixtures: writing search-space files and running commands as users do."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
# Reports at exit, one line each, whether the command imported the watched modules (Ray by
# default: commands validate before they import it).
_PROBE = ("import atexit, runpy, sys; watched = sys.argv.pop(1).split(','); "
          "atexit.register(lambda: print('\\n'.join(f'{m} imported' if m in sys.modules else f'{m} not imported' "
          "for m in watched))); "
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


# Credentials for an S3 endpoint that is not there (no lookup of real ones, no instance metadata).
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_EC2_METADATA_DISABLED": "true"}


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_file_override(command: list[str]) -> list[str]:
    """``command`` run so that file permissions apply to it: as root, without the capabilities
    that bypass them (``setpriv``), so a 0555 directory is read-only and a 0000 file unreadable."""
    if os.geteuid() != 0:
        return command
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *command]


def probe_command(module: str, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
                  wrap: Callable[[list[str]], list[str]] | None = None, watch: tuple[str, ...] = ("ray",)
                  ) -> subprocess.Popen:
    """``python -m MODULE ARGS`` started in ``cwd`` with this checkout on the path; its stdout
    ends with a line per ``watch`` module, ``ray imported`` or ``ray not imported`` by default.
    ``wrap`` rewrites the command line (``without_file_override``)."""
    command = [sys.executable, "-c", _PROBE, ",".join(watch), module, *args]
    return subprocess.Popen(wrap(command) if wrap else command, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def run_command(module: str, *args: str, cwd: Path = ROOT, timeout: float = 600, env: dict[str, str] | None = None,
                wrap: Callable[[list[str]], list[str]] | None = None,
                watch: tuple[str, ...] = ("ray",)) -> subprocess.CompletedProcess:
    """``probe_command``, run to its end."""
    proc = probe_command(module, *args, cwd=cwd, env=env, wrap=wrap, watch=watch)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def start_command(module: str, *args: str, cwd: Path = ROOT) -> subprocess.Popen:
    """``python -m MODULE ARGS`` started in ``cwd``, output piped, for tests that interrupt it."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
