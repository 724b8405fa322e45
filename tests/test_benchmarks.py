"""Every benchmark under benchmarks/ runs to its result line at a tiny size.

The benchmarks are scripts, not package code, so nothing else imports them: two of them once
crashed for months after an API they used moved. Each runs here as a user runs it (its own
process, from benchmarks/) with sizes that finish in seconds; the numbers are not checked, only
that the comparison it exists to print comes out.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaffold import ROOT

BENCHMARKS = ROOT / "benchmarks"

# script: (arguments, a line its result starts with, marks). "{data}" is the shared CIFAR-10 folder.
CASES: dict[str, tuple[list[str], str, list[pytest.MarkDecorator]]] = {
    "mask_overhead.py": (["--device", "cpu", "--width", "0.125", "--batch-size", "16", "--rounds", "2"],
                         "masked / unmasked step time:", []),
    "train_throughput.py": (["--device", "cpu", "--widths", "0.125", "--steps", "2", "--rounds", "1",
                             "--batch-size", "16", "--no-compile"], "target: ratio >=", []),
    "attack_throughput.py": (["--device", "cpu", "--width", "0.125", "--batch-size", "16", "--rounds", "1",
                              "--single-images", "2"], "rm_sweep / textbook:", []),
    "square_throughput.py": (["--device", "cpu", "--width", "0.125", "--queries", "5", "--rounds", "1",
                              "--single-images", "2", "--batch-size", "8"], "batched / single:", []),
    "data_cache_key.py": (["--folder", "{data}", "--rounds", "1"], "  fingerprint (stat per file)", []),
    "sweep_overhead.py": (["--device", "cpu", "--data", "folder:{data}", "--models", "2", "--train-subset", "100",
                           "--test-subset", "50", "--num-cpus", "2"], "  total ",
                          [pytest.mark.ray, pytest.mark.slow]),
    "matrix_scaling.py": (["--device", "cpu", "--sources", "1", "--targets", "2", "--images", "50",
                           "--train-images", "200", "--epochs", "1", "--size", "16", "--width", "0.125",
                           "--num-cpus", "2"], "pool speed-up, 2 actors over 1:", [pytest.mark.ray, pytest.mark.slow]),
    "gpu_sweep_speed.py": (["--device", "cpu", "--data", "folder:{data}", "--width", "0.125", "--train-subset", "200",
                            "--test-subset", "50", "--epochs", "2", "--trials", "1", "--cpus-per-trial", "1"],
                           "| fit alone, in process | 1 |", [pytest.mark.ray, pytest.mark.slow]),
}


def test_every_benchmark_script_has_a_case():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - {"common.py"}
    assert scripts == set(CASES)


@pytest.mark.parametrize("script", [pytest.param(s, marks=CASES[s][2]) for s in CASES])
def test_benchmark_prints_its_result(script: str, request: pytest.FixtureRequest, tmp_path: Path):
    arguments, result_line, _ = CASES[script]
    if any("{data}" in a for a in arguments):
        folder = str(request.getfixturevalue("cifar_folder"))
        arguments = [a.replace("{data}", folder) for a in arguments]
    # A private decoded-data cache and Inductor cache: nothing lands in the user's ~/.cache.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RM_SWEEP_DATA_DIR": str(tmp_path / "data"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    run = subprocess.run([sys.executable, script, *arguments], cwd=BENCHMARKS, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(line.startswith(result_line) for line in run.stdout.splitlines()), run.stdout[-3000:]
