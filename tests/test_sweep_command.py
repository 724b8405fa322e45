"""``python -m rm_sweep.sweep`` hands its flags to ``rm_sweep.pipeline.train`` (Ray itself is not started here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rm_sweep import pipeline, sweep
from rm_sweep.errors import cli_main

from scaffold import write_space

pytest.importorskip("ray")
from rm_sweep.orchestration.values import SweepResult

SPACE = {"name": "one", "data": "folder:{data}", "recipe": {"name": "quick", "epochs": 1},
         "models": [{"name": "normal", "arch": "resnet18", "width": 0.125}]}


@pytest.mark.parametrize("flags, expected", [
    ([], {"compile": None, "gpus_per_trial": None, "max_concurrent": None, "verbose": 0, "mlflow": None}),
    (["--no-compile", "--gpus-per-trial", "0.5"], {"compile": False, "gpus_per_trial": 0.5}),
    (["--compile", "--max-concurrent", "3"], {"compile": True, "max_concurrent": 3}),
])
def test_flags_reach_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                  expected: dict) -> None:
    space = write_space(tmp_path / "one.yaml", {**SPACE, "data": f"folder:{tmp_path / 'data'}"})
    calls = []

    def fake_train(space, store, **kwargs):
        calls.append(kwargs)
        return SweepResult()

    monkeypatch.setattr(pipeline, "train", fake_train)
    sweep.main([str(space), "--store", str(tmp_path / "store"), "--quiet", *flags])
    assert len(calls) == 1 and {k: calls[0][k] for k in expected} == expected


@pytest.mark.parametrize("flags, verbose", [([], 1), (["--quiet"], 0), (["--verbose"], 2)])
def test_console_flags_set_the_verbosity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                         verbose: int) -> None:
    space = write_space(tmp_path / "one.yaml", {**SPACE, "data": f"folder:{tmp_path / 'data'}"})
    calls = []
    monkeypatch.setattr(pipeline, "train", lambda space, store, **kwargs: calls.append(kwargs) or SweepResult())
    sweep.main([str(space), "--store", str(tmp_path / "store"), *flags])
    assert calls[0]["verbose"] == verbose


def test_mlflow_without_mlflow_installed_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    space = write_space(tmp_path / "one.yaml", {**SPACE, "data": f"folder:{tmp_path / 'data'}"})
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("the pipeline ran"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(sweep.main, [str(space), "--store", str(tmp_path / "store"), "--mlflow", str(tmp_path / "mlruns")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: python -m rm_sweep.sweep: argument --mlflow: MLflow is not "
                                               "installed: pip install 'rm_sweep[mlflow]' (see --help)")
