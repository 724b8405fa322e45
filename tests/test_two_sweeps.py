"""Two sweeps started at once on one empty store, each with its own private Ray instance (1 CPU
each; tiny ResNet-18s on the toy folder of tests/tinystore.py): together they train every model
exactly once, each skipping what the other holds a lease on, and neither fails."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from rm_sweep.leases import LEASE_DIR
from rm_sweep.spaces import load_space
from rm_sweep.store import RUN_DIR, Store

from scaffold import start_command
from tinystore import space_file, write_tinted_folder

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SUMMARY = re.compile(r"(\d+) trained, (\d+) already in .*, (\d+) failed, (\d+) leased by another run, (\d+) unfinished")


def test_two_sweeps_on_one_store_train_each_model_once(tmp_path: Path, data_dir: Path) -> None:
    folder = write_tinted_folder(tmp_path / "tinted", train=10, test=10)
    path = space_file(tmp_path, folder, [{"name": "m", "seed": [0, 1, 2, 3, 4, 5]}], [], epochs=3)
    command = [str(path), "--store", str(tmp_path / "store"), "--num-cpus", "1", "--data-dir", str(data_dir), "--quiet"]
    sweeps = [start_command("rm_sweep.sweep", *command) for _ in range(2)]
    outputs = [sweep.communicate(timeout=1200)[0] for sweep in sweeps]
    counts = []
    for sweep, output in zip(sweeps, outputs):
        (found,) = SUMMARY.findall(output) or [("",) * 5]
        assert found[0], output[-3000:]
        trained, _, failed, leased, unfinished = map(int, found)
        assert failed == unfinished == 0 and sweep.returncode == (1 if leased else 0), output[-3000:]
        assert output.count("leased by another run (run ") == leased  # one line per leased model
        counts.append(trained)
    space = load_space(path)
    store = Store(tmp_path / "store")
    assert sum(counts) == len(space.models()) == 6  # a model trained by both runs would count twice
    assert min(counts) >= 1, outputs  # they shared the work
    assert store.missing(space.models()) == [] and len(store.models()) == 6
    assert not list((tmp_path / "store" / LEASE_DIR).iterdir())  # every lease released
    assert not list((tmp_path / "store" / RUN_DIR / "train").iterdir())  # no training state left
