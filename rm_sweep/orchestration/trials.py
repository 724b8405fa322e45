"""Training on Ray: one Ray Tune trial per model, a Ray Train ``TorchTrainer`` inside each trial.

    setup = TrialSetup.of(space.data, store, space.resources, data_dir=None, compile=None, owner=Owner.new())
    result = run_trials(specs, store, setup, name=f"sweep-{space.name}")

Per model the Tune function ``_trial`` builds a ``TorchTrainer`` (Ray Train V2) with one worker
whose loop (``_worker``) restores the training state from ``ray.train.get_checkpoint()``, calls
``rm_sweep.train.fit`` and, after every epoch, reports the metrics with the state directory as
a checkpoint; ``TuneReportCallback`` forwards them to Tune. Train's checkpoints live in the
store's run storage (``Store.run_location``: shared storage on a cluster), so a worker that dies
is restarted from its last epoch (``FailureConfig``), and a model whose sweep is run again
continues its Train run, which is named after the model id. The worker writes the finished model
to the store, once: the store's files are named by model id.

Before training, a trial claims its model (``rm_sweep.leases``): a model another live run holds is
skipped and reported, so two sweeps on one store share the work instead of training every model
twice. The trial renews its lease while it runs, the worker after every epoch. A training state
left by an earlier run (``_ray/train/<model_id>``) is resumed if Ray Train's snapshot and our
weights-only state load; otherwise it is deleted and the model trained from the start (reported).

An error a rerun would repeat (``UserError``: a diverging loss, bad data) is reported by the
worker and ends the trial at once; only other failures (a lost node, a killed process) are
retried (``FailureConfig``).

Tune's own state (its experiment files, pickled trial errors) stays in a driver-local temporary
directory and is never read back: nothing written to a shared store is unpickled. What the sweep
reports comes from a driver-side callback (``rm_sweep.orchestration.console.Collector``), not from
Tune's result files; it also draws the console's one progress bar. Each trial's config is its
model's spec, so an ``MLflowLoggerCallback`` (``mlflow=``) logs it with the per-epoch metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from rm_sweep.data import load_dataset
from rm_sweep.errors import UserError
from rm_sweep.leases import Leases, Owner
from rm_sweep.orchestration import faults
from rm_sweep.orchestration.console import (
    Collector,
    mlflow_callbacks,
    model_id_of,
    tune_console,
)
from rm_sweep.orchestration.values import TRIAL_CPU, SweepResult
from rm_sweep.spaces import Resources
from rm_sweep.spec import ModelSpec, parse_data_spec
from rm_sweep.store import RUN_DIR, Store
from rm_sweep.train import fit

# Columns of Tune's progress table come from the first metrics of each report.
_SHOWN_FIRST = ("epoch", "test_accuracy", "train_accuracy", "train_loss")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints (JSON)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs besides its model; passed once through Ray's object store.

    Attributes:
        data: where the data set is loaded from (``folder:`` paths absolute: Ray runs trials in
            their own working directories).
        data_dir: where workers find and cache data sets (absolute, or None for the default).
        store: the store's location. resources: what each trial asks for.
        compile: ``fit``'s ``compile`` for every trial (None: on for trials with a GPU).
        owner: the run whose leases the trials hold.
    """

    data: str
    data_dir: str | None
    store: str
    resources: Resources
    compile: bool | None
    owner: Owner

    @classmethod
    def of(cls, data: str, store: Store, resources: Resources, *, data_dir: str | os.PathLike | None,
           compile: bool | None, owner: Owner) -> TrialSetup:
        spec = parse_data_spec(data)
        absolute = data if spec.path is None else f"{spec.kind}:{os.path.abspath(os.path.expanduser(spec.path))}"
        return cls(absolute, None if data_dir is None else os.path.abspath(data_dir), store.location(), resources,
                   compile, owner)

    def leases(self, store: Store) -> Leases:
        return Leases(store.files, self.owner)

    @property
    def train_storage(self) -> str:
        return Store(self.store).run_location("train")


def trials_that_fit(total: Mapping[str, float], resources: Resources) -> int | None:
    """Trials of ``resources`` that ``total`` CPUs and GPUs (``ray.cluster_resources()``) hold at
    once; None if none fit yet (an autoscaling cluster starting from zero workers: let it see
    every trial's demand)."""
    fits = [math.floor(total.get("CPU", 0) / resources.cpus_per_trial + 1e-9)]
    if resources.gpus_per_trial > 0:
        fits.append(math.floor(total.get("GPU", 0) / resources.gpus_per_trial + 1e-9))
    return min(fits) or None


def run_trials(specs: Sequence[ModelSpec], store: Store, setup: TrialSetup, *, name: str,
               max_concurrent: int | None = None, fixed_size: bool = False, verbose: int = 1,
               mlflow: str | None = None) -> SweepResult:
    """Train ``specs`` on the connected Ray cluster, one Tune trial each, into ``store``.

    Args:
        specs: the models to train (``Store.missing``: none of them stored yet).
        store: where each finished model lands. setup: what the trials share.
        name: the Tune experiment's name (``sweep-<space>``).
        max_concurrent: trials at once (default: the space's, else what the cluster's CPUs and
            GPUs hold now, else unlimited so an autoscaler sees the whole demand).
        fixed_size: the cluster cannot grow (a private local instance): at most what it holds run
            at once, whatever ``max_concurrent`` says, since trials beyond that would each take
            their Tune share of a CPU and then none could start its worker.
        verbose: 0 silent, 1 one progress bar, 2 Tune's table (instead of the bar) and everything
            Ray prints.
        mlflow: an MLflow tracking URI: each trial's spec and per-epoch metrics are logged there
            (the optional extra ``rm_sweep[mlflow]``); the store stays the source of truth.
    Returns:
        ``trained``, ``skipped`` (stored by another run meanwhile), ``failed``, ``unfinished``,
        ``leased`` (held by another live run), ``restarted`` (an earlier training state was
        unusable), ``epochs_reported`` and ``timings`` of ``specs``.
    """
    resources = setup.resources
    fits = trials_that_fit(ray.cluster_resources(), resources)
    concurrency = max_concurrent or resources.max_concurrent_trials or fits
    if fixed_size:
        concurrency = min(concurrency or 1, fits or 1)
    collector = Collector(specs, progress=verbose == 1)
    callbacks: list[ray.tune.Callback] = [collector, *mlflow_callbacks(mlflow, name)]
    tune_dir = tempfile.mkdtemp(prefix="rm_sweep-tune-")  # driver-local: never shared, never restored
    try:
        tuner = ray.tune.Tuner(
            ray.tune.with_resources(
                ray.tune.with_parameters(_trial, setup=setup, specs={s.model_id: s for s in specs}),
                {"cpu": TRIAL_CPU}),
            # One trial per model; Tune's table shows the id as the "model" column and the
            # model's description as the trial name.
            param_space={"model": ray.tune.grid_search([{"model_id": s.model_id, **s.to_dict()} for s in specs])},
            tune_config=ray.tune.TuneConfig(
                max_concurrent_trials=concurrency, reuse_actors=True, trial_dirname_creator=_trial_dirname,
                trial_name_creator=functools.partial(_trial_name, collector.labels)),
            run_config=ray.tune.RunConfig(
                name=name, storage_path=tune_dir, verbose=2 if verbose >= 2 else 0, callbacks=callbacks,
                # A trial whose own process dies (its node removed) is retried; its Train run resumes.
                failure_config=ray.tune.FailureConfig(max_failures=resources.max_failures),
            ),
        )
        with tune_console(verbose):
            tuner.fit()
    finally:
        collector.close()
        shutil.rmtree(tune_dir, ignore_errors=True)
        leases = setup.leases(store)
        for lease in leases.all():  # each trial releases its own; these are of trials cut short (Ctrl-C)
            if lease.owner.run == setup.owner.run:
                leases.release(lease.model_id)
    missing = {s.model_id for s in store.missing(specs)}
    elsewhere = collector.leased.keys() | collector.stored  # trained, or being trained, by another run
    return SweepResult(
        trained=[s.model_id for s in specs if s.model_id not in missing and s.model_id not in elsewhere],
        skipped=[s.model_id for s in specs if s.model_id not in missing and s.model_id in elsewhere],
        failed={k: v for k, v in collector.failed.items() if k in missing},
        unfinished=[s.model_id for s in specs if s.model_id in missing and s.model_id not in collector.failed
                    and s.model_id not in collector.leased],
        leased={k: v for k, v in collector.leased.items() if k in missing},
        restarted=collector.restarted, timings=collector.timings, epochs_reported=collector.epochs,
        epoch_metrics=collector.epoch_metrics)


def _trial_name(labels: dict[str, str], trial: Any) -> str:
    model_id = model_id_of(trial)
    return f"{labels.get(model_id, 'model')} ({model_id[:8]})"


def _trial_dirname(trial: Any) -> str:
    return f"{model_id_of(trial)}-{trial.trial_id}"


def _trial(config: dict[str, Any], setup: TrialSetup, specs: Mapping[str, ModelSpec]) -> None:
    """Tune function: one model, trained by a one-worker ``TorchTrainer`` unless already stored or
    leased by another run."""
    t0 = time.time()
    spec = specs[config["model"]["model_id"]]
    store = Store(setup.store)
    leases = setup.leases(store)
    other = leases.acquire(spec.model_id)
    if other is not None:
        ray.tune.report({"leased_by": other.describe()})
        return
    with leases.kept(spec.model_id):
        if store.has_model(spec.model_id):  # stored meanwhile (a retried trial, or another run)
            ray.tune.report({"epoch": spec.recipe_config().epochs, "stored": True})
            return
        restarted = _check_run(store, spec.model_id)
        metrics = _train(spec, setup)
        if not store.has_model(spec.model_id):  # the worker stopped on a UserError (reported, not retried)
            ray.tune.report({"error": f"training of {spec.model_id} ended without storing the model"})
            return
        store.remove_training_state(spec.model_id)
    restarted = restarted or metrics.get("restarted")
    ray.tune.report({
        "epoch": metrics.get("epoch", spec.recipe_config().epochs), "test_accuracy": metrics.get("test_accuracy"),
        "train_seconds": metrics.get("train_seconds", 0.0),
        "startup_seconds": metrics.get("worker_started_at", t0) - t0, "setup_seconds": metrics.get("setup_seconds", 0.0),
        "trial_seconds": time.time() - t0, **({"restarted": restarted} if restarted else {}),
    })


def _check_run(store: Store, model_id: str) -> str | None:
    """Delete the model's earlier Train run unless Ray Train can resume it: its snapshot (JSON)
    must parse, come from this Ray version and name as its latest checkpoint a directory of the
    run that exists. Returns why it was deleted, or None. (The checkpoint's content, our
    weights-only training state, is checked by ``fit`` in the worker.)"""
    if model_id not in store.training_runs():
        return None
    run = store.path(RUN_DIR, "train", model_id)
    data = store.files.read(f"{run}/{SNAPSHOT}", f"Ray Train snapshot of {model_id}", missing_ok=True)
    try:
        if data is None:
            problem, latest = "it has no checkpoint snapshot", None
        else:
            snapshot = json.loads(data)
            latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
            problem = f"written by Ray {snapshot.get('ray_version')}, this is Ray {ray.__version__}" \
                if snapshot.get("ray_version") != ray.__version__ else None
    except (ValueError, AttributeError):
        problem, latest = "its checkpoint snapshot is not valid JSON", None
    if problem is None and latest is not None and (not isinstance(latest, str) or not latest.startswith("checkpoint_")
                                                   or "/" in latest or store.files.info(f"{run}/{latest}").type
                                                   != pafs.FileType.Directory):
        problem = f"its snapshot names a checkpoint that is not there ({latest!r})"
    if problem:
        store.remove_training_state(model_id)
    return f"an earlier training state was deleted ({problem})" if problem else None


def _train(spec: ModelSpec, setup: TrialSetup) -> dict[str, Any]:
    """Run the model's Train run to its end; its last metrics."""
    resources = setup.resources
    gpus = resources.gpus_per_trial
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"setup": setup, "spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=gpus > 0,
            resources_per_worker={"CPU": resources.cpus_per_trial - TRIAL_CPU, **({"GPU": gpus} if gpus > 0 else {})}),
        run_config=ray.train.RunConfig(
            name=spec.model_id, storage_path=setup.train_storage,
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
    )
    return trainer.fit().metrics or {}  # fit() raises if training failed after max_failures retries


def _worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: restore, ``fit`` with a report (and a lease renewal) per epoch,
    store the model. A ``UserError`` is reported as the run's last metrics, not raised: Train
    would retry it, and it would happen again."""
    started = time.time()
    setup: TrialSetup = config["setup"]
    spec: ModelSpec = config["spec"]
    store = Store(setup.store)
    leases = setup.leases(store)
    torch.set_num_threads(max(1, round(setup.resources.cpus_per_trial)))  # the trial's cores
    gpu = setup.resources.gpus_per_trial > 0
    device = ray.train.torch.get_device() if gpu else torch.device("cpu")
    state_dir = Path(tempfile.mkdtemp(prefix=f"rm_sweep-{spec.model_id}-"))
    restarted: list[str] = []
    try:
        data = load_dataset(setup.data, data_dir=setup.data_dir, train_subset=spec.train_subset,
                            test_subset=spec.test_subset)
        # fit() checks a resumed state against the data's name: use the location-free identity so
        # a trial resumed on a machine with the data at another path is accepted.
        data = dataclasses.replace(data, name=spec.data)
        model = spec.create(data)
        setup_seconds = time.time() - started
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(state_dir))

        def report(metrics: dict[str, Any], directory: Path | None) -> None:
            faults.inject("epoch", f"{spec.model_id}/{metrics['epoch']}")
            if not leases.renew(spec.model_id):
                raise UserError(f"the lease of {spec.model_id} was taken over by another run (this one had "
                                "stopped renewing it): training stopped")
            shown = {k: metrics[k] for k in _SHOWN_FIRST}
            notes = {"restarted": f"an earlier training state was unusable ({restarted[0]})"} if restarted else {}
            ray.train.report({**shown, **metrics, "setup_seconds": setup_seconds, "worker_started_at": started,
                              **notes}, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))

        final = fit(model, data, spec.recipe_config(), report, state_dir=state_dir, device=device, seed=spec.seed,
                    compile=setup.compile, on_unusable_state=restarted.append)
        if ray.train.get_context().get_world_rank() == 0:
            store.add_model(spec, final, model.cpu())
    except UserError as exc:
        ray.train.report({"error": str(exc)})
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


__all__ = ["TrialSetup", "run_trials", "trials_that_fit"]
