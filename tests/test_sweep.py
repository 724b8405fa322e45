"""The sweep on local Ray instances (2 CPUs): one row per model, an interrupted sweep resumes without
losing finished work, reruns train nothing, a killed worker resumes from its checkpoint.
Tiny models (width 0.125, 200 images, 1-2 epochs)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from rm_sweep.data import load_dataset
from rm_sweep.pipeline import train
from rm_sweep.spaces import SearchSpace, load_space
from rm_sweep.store import Store
from rm_sweep.train import evaluate_accuracy, fit

from scaffold import ROOT, run_command, start_command, tiny_space, write_space

DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the CIFAR-10 JPEG folder at {DATA}")]
# A normal model and a two-member ensemble: three models.
THREE = [{"name": "normal"}, {"name": "en", "shallow_ratio": 0.5, "ensemble": 2}]


def write_tiny_space(tmp_path: Path, name: str, models: list[dict], epochs: int = 1) -> Path:
    return write_space(tmp_path / f"{name}.yaml",
                       tiny_space(name, DATA, models, epochs=epochs, train_subset=200, test_subset=100))


def interrupt_after_first_model(command: list[str], cwd: Path, models: Path) -> str:
    """Run the sweep command and press Ctrl-C once a model is stored; returns its output."""
    first = start_command("rm_sweep.sweep", *command, cwd=cwd)
    deadline = time.monotonic() + 300
    while not (models.is_dir() and any(p.suffix == ".parquet" for p in models.iterdir())):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=180)[0]
    assert first.returncode != 0, output
    return output


def assert_checkpoints_are_the_stored_models(store: Store) -> None:
    data = load_dataset(f"folder:{DATA}", train_subset=200, test_subset=100)
    for row in store.models().itertuples():
        model = store.load_model(row.model_id)
        assert evaluate_accuracy(model, data.test_x, data.test_y) == pytest.approx(row.clean_accuracy)


def resume(command: list[str], cwd: Path, done: dict[str, int]) -> None:
    """Run the interrupted command again: it trains only what is missing."""
    resumed = run_command("rm_sweep.sweep", *command, cwd=cwd)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{3 - len(done)} trained, {len(done)} already in" in resumed.stdout


def assert_one_row_per_model(space: SearchSpace, store: Store, done: dict[str, int]) -> None:
    models = Path(store.path("models"))
    assert len(space.models()) == 3 and sorted(store.models().model_id) == sorted(s.model_id for s in space.models())
    assert all((models / name).stat().st_mtime_ns == stamp for name, stamp in done.items())  # not written again
    assert store.ensembles().ensemble_id.tolist() == [space.ensembles()[0].ensemble_id]


def rerun_trains_nothing(space: SearchSpace, store: Store, command: list[str], cwd: Path) -> None:
    """Finished: the pipeline trains nothing and the command does not even import Ray."""
    models = Path(store.path("models"))
    files = {p.name: p.stat().st_mtime_ns for p in models.iterdir()}
    again = train(space, store, verbose=0)
    assert again.trained == [] and sorted(again.skipped) == sorted(s.model_id for s in space.models())
    assert again.epochs_reported == {}
    rerun = run_command("rm_sweep.sweep", *command, cwd=cwd)
    assert rerun.returncode == 0 and "3 of 3 models" in rerun.stdout, rerun.stderr
    assert rerun.stdout.strip().endswith("ray not imported")
    assert {p.name: p.stat().st_mtime_ns for p in models.iterdir()} == files


def test_an_interrupted_sweep_resumes_and_lands_one_row_per_model(tmp_path: Path) -> None:
    path = write_tiny_space(tmp_path, "three", THREE)
    models = tmp_path / "store" / "models"
    # Relative paths, as people type them (Ray runs trials in other working directories).
    command = [path.name, "--store", "store", "--data", f"folder:{os.path.relpath(DATA, tmp_path)}",
               "--num-cpus", "2", "--quiet"]
    interrupt_after_first_model(command, tmp_path, models)  # two trials at a time: the third cannot be done
    done = {p.name: p.stat().st_mtime_ns for p in models.iterdir()}
    assert 1 <= len(done) < 3

    resume(command, tmp_path, done)
    space = load_space(path, data=f"folder:{DATA}")  # the same data set, so the same model ids
    store = Store(tmp_path / "store")
    assert_one_row_per_model(space, store, done)
    assert_checkpoints_are_the_stored_models(store)
    rerun_trains_nothing(space, store, command, tmp_path)


def _trained_in_one_process(space: SearchSpace) -> dict[str, torch.Tensor]:
    (spec,) = space.models()
    data = load_dataset(f"folder:{DATA}", train_subset=200, test_subset=100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (1 CPU per trial)
    try:
        reference = spec.create(data)
        fit(reference, data, spec.recipe_config(), seed=spec.seed, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return reference.state_dict()


@pytest.mark.timeout(400)
def test_a_private_instance_runs_no_more_trials_than_it_holds(tmp_path: Path) -> None:
    # Two trials of 2 CPUs asked to run at once on 2 CPUs: both would take their Tune share and
    # neither could start its worker. One at a time, both finish.
    # Defined before the tests that share ``local_ray``: with that session up, train would use it.
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized(), "another test left a Ray session connected"
    space = load_space(write_tiny_space(tmp_path, "crowded", [{"name": "m", "seed": [0, 1]}]))
    result = train(space, Store(tmp_path / "store"), num_cpus=2, cpus_per_trial=2, max_concurrent=2, verbose=0)
    assert result.ok and sorted(result.trained) == sorted(s.model_id for s in space.models())
    assert all(len(epochs) == 1 for epochs in result.epoch_metrics.values())


def test_a_killed_worker_resumes_from_its_checkpoint(tmp_path: Path, local_ray) -> None:
    space = load_space(write_tiny_space(tmp_path, "crash", [{"name": "m", "shallow_ratio": 0.5}], epochs=2))
    (spec,) = space.models()
    # The worker exits abruptly after training epoch 2, before reporting it: epoch 1's checkpoint
    # is the last one, as if the process had been killed mid-training.
    struck = local_ray.arm("epoch")
    store = Store(tmp_path / "store")
    result = train(space, store, verbose=0)

    assert struck.exists()  # the worker was killed
    assert result.ok and result.trained == [spec.model_id]
    assert result.epochs_reported[spec.model_id] == [1, 2]  # epoch 1 was not trained again
    assert store.models().model_id.tolist() == [spec.model_id]
    stored = store.load_model(spec.model_id).state_dict()
    reference = _trained_in_one_process(space)  # resuming is exact: the same weights as without interruption
    assert all(torch.equal(stored[k], v) for k, v in reference.items())
    assert not os.listdir(tmp_path / "store" / "_ray" / "train")  # finished runs leave no training state


def test_mlflow_gets_each_models_spec_and_per_epoch_metrics(tmp_path: Path, local_ray) -> None:
    mlflow = pytest.importorskip("mlflow")
    space = load_space(write_tiny_space(tmp_path, "tracked", [{"name": "m", "shallow_ratio": 0.5}], epochs=2))
    (spec,) = space.models()
    uri = (tmp_path / "mlruns").as_uri()
    result = train(space, Store(tmp_path / "store"), verbose=0, mlflow=uri)
    assert result.ok

    client = mlflow.MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "sweep-tracked"]
    (run,) = client.search_runs([experiment.experiment_id])
    params = run.data.params
    assert params["model/model_id"] == spec.model_id
    assert params["model/arch"] == "resnet18" and float(params["model/mask/shallow_ratio"]) == 0.5
    # One point per report: each epoch's, then the trial's closing summary (which repeats the last).
    epochs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch")}
    accuracy = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test_accuracy")}
    assert sorted(set(epochs.values())) == [1, 2] and accuracy.keys() == epochs.keys()
    assert accuracy[max(accuracy)] == pytest.approx(Store(tmp_path / "store").models().clean_accuracy.iloc[0])
