"""The sweep on local Ray instances (2 CPUs): one row per model, an interrupted sweep resumes without
losing finished work, reruns train nothing, a killed worker resumes from its checkpoint.
Tiny models (width 0.125, 200 images, 1-2 epochs)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rm_sweep.data import load_dataset
from rm_sweep.spaces import load_space
from rm_sweep.store import Store
from rm_sweep.train import evaluate_accuracy, fit

ray = pytest.importorskip("ray")
from rm_sweep.orchestration.sweep import FAULT_ENV, run_sweep  # noqa: E402  (needs ray)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the CIFAR-10 JPEG folder at {DATA}")]

SPACE = """\
    name: {name}
    data: folder:{data}
    train_subset: 200
    test_subset: 100
    recipe: {{name: quick, epochs: {epochs}, batch_size: 32}}
    resources: {{cpus_per_trial: 1, max_failures: 2}}
    models:
{models}
"""


def write_space(tmp_path: Path, name: str, models: str, epochs: int = 1) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(SPACE).format(name=name, data=DATA, epochs=epochs,
                                                  models=textwrap.indent(textwrap.dedent(models), "      ")))
    return path


@pytest.fixture(scope="module")
def local_ray():
    """One 2-CPU Ray instance for the module (``run_sweep`` uses it instead of starting its own)."""
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def run_command(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m rm_sweep.sweep ARGS`` in ``cwd``, reporting at exit whether Ray was imported."""
    probe = ("import atexit, runpy, sys; "
             "atexit.register(lambda: print('ray imported' if 'ray' in sys.modules else 'ray not imported')); "
             "sys.argv = ['rm_sweep.sweep', *sys.argv[1:]]; runpy.run_module('rm_sweep.sweep', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", probe, *args], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)


def test_an_interrupted_sweep_resumes_and_lands_one_row_per_model(tmp_path):
    path = write_space(tmp_path, "three", """\
        - name: normal
          arch: resnet18
          width: 0.125
        - name: en                 # two mask seeds: two models and one ensemble
          arch: resnet18
          width: 0.125
          shallow_ratio: 0.5
          ensemble: 2
    """)
    store_dir, models = tmp_path / "store", tmp_path / "store" / "models"
    # Relative paths, as people type them (Ray runs trials in other working directories).
    command = [path.name, "--store", "store", "--data", f"folder:{os.path.relpath(DATA, tmp_path)}",
               "--num-cpus", "2", "--quiet"]
    # The command in its own Ray instance (two trials at a time); Ctrl-C once a model is stored,
    # before the third trial can have finished.
    first = subprocess.Popen([sys.executable, "-m", "rm_sweep.sweep", *command], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (models.is_dir() and any(p.suffix == ".parquet" for p in models.iterdir())):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=180)[0]
    assert first.returncode != 0, output
    done = {p.name: p.stat().st_mtime_ns for p in models.iterdir()}
    assert 1 <= len(done) < 3, output

    resumed = run_command(*command, "--resume", cwd=tmp_path)  # Tuner.restore: finished trials stay finished
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{3 - len(done)} trained, {len(done)} already in" in resumed.stdout

    space = load_space(path, data=f"folder:{DATA}")  # the same data set, so the same model ids
    store = Store(store_dir)
    ids = sorted(s.model_id for s in space.models())
    rows = store.models()
    assert len(ids) == 3 and sorted(rows.model_id) == ids
    assert all((models / name).stat().st_mtime_ns == stamp for name, stamp in done.items())  # not written again
    (ensemble,) = space.ensembles()
    assert store.ensembles().ensemble_id.tolist() == [ensemble.ensemble_id]
    data = load_dataset(f"folder:{DATA}", train_subset=200, test_subset=100)
    for row in rows.itertuples():
        model = store.load_model(row.model_id)  # the checkpoint is the trained model:
        assert evaluate_accuracy(model, data.test_x, data.test_y) == pytest.approx(row.clean_accuracy)

    files = {p.name: p.stat().st_mtime_ns for p in models.iterdir()}
    again = run_sweep(space, store, verbose=0)
    assert again.trained == [] and sorted(again.skipped) == ids and again.epochs_reported == {}
    rerun = run_command(*command, cwd=tmp_path)  # the command, run again, does not even import Ray
    assert rerun.returncode == 0 and "3 of 3 models" in rerun.stdout, rerun.stderr
    assert rerun.stdout.strip().endswith("ray not imported")
    assert {p.name: p.stat().st_mtime_ns for p in models.iterdir()} == files


def test_a_killed_worker_resumes_from_its_checkpoint(tmp_path, local_ray, monkeypatch):
    path = write_space(tmp_path, "crash", """\
        - name: m
          arch: resnet18
          width: 0.125
          shallow_ratio: 0.5
    """, epochs=2)
    space = load_space(path)
    (spec,) = space.models()
    marker = tmp_path / "killed"
    # The worker exits abruptly after training epoch 2, before reporting it: epoch 1's checkpoint
    # is the last one, as if the process had been killed mid-training.
    monkeypatch.setenv(FAULT_ENV, f"{spec.model_id}:2:{marker}")
    store = Store(tmp_path / "store")
    result = run_sweep(space, store, verbose=0)

    assert marker.exists()  # the worker was killed
    assert result.ok and result.trained == [spec.model_id]
    assert result.epochs_reported[spec.model_id] == [1, 2]  # epoch 1 was not trained again
    assert store.models().model_id.tolist() == [spec.model_id]

    # Resuming is exact: the same weights as training without interruption, in one process.
    data = load_dataset(f"folder:{DATA}", train_subset=200, test_subset=100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (1 CPU per trial)
    try:
        reference = spec.create(data)
        fit(reference, data, spec.recipe_config(), seed=spec.seed, device="cpu")
    finally:
        torch.set_num_threads(threads)
    stored = store.load_model(spec.model_id).state_dict()
    assert all(torch.equal(stored[k], v) for k, v in reference.state_dict().items())
    assert not os.listdir(tmp_path / "store" / "_ray" / "train")  # finished runs leave no training state
