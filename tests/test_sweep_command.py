"""``python -m rm_sweep.sweep`` hands its flags to ``run_sweep`` (Ray itself is not started here)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rm_sweep import sweep

pytest.importorskip("ray")
from rm_sweep.orchestration import sweep as orchestration  # noqa: E402  (needs ray)

SPACE = """\
    name: one
    data: folder:{data}
    recipe: {{name: quick, epochs: 1}}
    models:
      - {{name: normal, arch: resnet18, width: 0.125}}
"""


@pytest.mark.parametrize("flags, expected", [
    ([], {"compile": None, "gpus_per_trial": None, "max_concurrent": None, "resume": False}),
    (["--no-compile", "--gpus-per-trial", "0.5"], {"compile": False, "gpus_per_trial": 0.5}),
    (["--compile", "--max-concurrent", "3", "--resume"], {"compile": True, "max_concurrent": 3, "resume": True}),
])
def test_flags_reach_run_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str],
                               expected: dict) -> None:
    space = tmp_path / "one.yaml"
    space.write_text(textwrap.dedent(SPACE).format(data=tmp_path / "data"))
    calls = []

    def fake_run_sweep(space, store, **kwargs):
        calls.append(kwargs)
        return orchestration.SweepResult()

    monkeypatch.setattr(orchestration, "run_sweep", fake_run_sweep)
    sweep.main([str(space), "--store", str(tmp_path / "store"), "--quiet", *flags])
    assert len(calls) == 1 and {k: calls[0][k] for k in expected} == expected
