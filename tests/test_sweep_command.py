"""``python -m rm_sweep.sweep`` hands its flags to ``rm_sweep.pipeline.train`` (Ray itself is not started here)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rm_sweep import pipeline, sweep
from scaffold import write_space

pytest.importorskip("ray")
from rm_sweep.orchestration.values import SweepResult

SPACE = {"name": "one", "data": "folder:{data}", "recipe": {"name": "quick", "epochs": 1},
         "models": [{"name": "normal", "arch": "resnet18", "width": 0.125}]}


@pytest.mark.parametrize("flags, expected", [
    ([], {"compile": None, "gpus_per_trial": None, "max_concurrent": None}),
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
