"""Train every model of a search space: one Ray Tune trial per model, Ray Train inside each trial.

    run_sweep(load_space("search_spaces/quick.yaml"), "store")

Per model the Tune function ``_trial`` builds a ``TorchTrainer`` (Ray Train V2) with one worker
whose loop (``_worker``) restores the training state from ``ray.train.get_checkpoint()``, calls
``rm_sweep.train.fit`` and, after every epoch, reports the metrics with the state directory as
a checkpoint; ``TuneReportCallback`` forwards them to Tune's progress table. Checkpoints live in
the run storage ``STORE/_ray`` (shared storage on a cluster: an ``s3://`` store), so a worker
that dies is restarted from its last epoch (``FailureConfig``), and a trial that is run again
(a rerun, ``--resume``) continues its Train run, which is named after the model id. The worker
writes the finished model to the store, once: the store's files are named by model id.

Models the store already holds are dropped before Ray starts; with nothing to train, no Ray
instance is started at all.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from rm_sweep.data import load_dataset, parse_data_spec
from rm_sweep.errors import UserError
from rm_sweep.orchestration.session import ray_session
from rm_sweep.spaces import Resources, SearchSpace
from rm_sweep.spec import ModelSpec
from rm_sweep.store import Store, resolve_uri
from rm_sweep.train import fit

# Fault injection for tests: "MODEL_ID:EPOCH:MARKER" makes that model's worker exit abruptly once
# it has trained EPOCH and before reporting it, as a killed worker would; MARKER is created first
# so the restarted worker carries on.
FAULT_ENV = "RM_SWEEP_FAULT"
RUN_DIR = "_ray"  # Ray's run storage inside the store; "_" hides it from Parquet readers
# The Tune function only waits for its trainer (Ray rejects 0 CPUs). Its share comes out of the
# trial's cpus_per_trial, so N trials of c CPUs fill N * c CPUs exactly: with the share on top,
# 2 trials of 1 CPU would not fit 2 CPUs and the second worker would wait for the first.
TRIAL_CPU = 0.01
# Columns of Tune's progress table come from the first metrics of each report.
_SHOWN_FIRST = ("epoch", "test_accuracy", "train_accuracy", "train_loss")


@dataclass(frozen=True)
class TrialTiming:
    """Where a trial's wall time went, in seconds (measured inside the trial).

    ``startup``: Tune function start -> worker loop start (Train controller, worker group);
    ``setup``: data loading and model construction in the worker; ``train``: ``fit``'s own
    time over all epochs (resumed runs included); ``total``: the whole Tune function.
    """

    startup: float
    setup: float
    train: float
    total: float

    @property
    def other(self) -> float:
        """Reporting and checkpoint upload per epoch, store write, shutting the trainer down."""
        return self.total - self.startup - self.setup - self.train


@dataclass
class SweepResult:
    """What a sweep did, by model id: trained now, found in the store, failed (id -> error), or
    unfinished (the sweep was interrupted; running it again continues them)."""

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unfinished: list[str] = field(default_factory=list)
    timings: dict[str, TrialTiming] = field(default_factory=dict)
    epochs_reported: dict[str, list[int]] = field(default_factory=dict)
    ray_init_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unfinished


def run_sweep(
    space: SearchSpace,
    store: Store | str,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
    data_dir: str | os.PathLike | None = None,
    compile: bool | None = None,
    verbose: int = 1,
) -> SweepResult:
    """Train every model of ``space`` that ``store`` lacks; record its ensembles.

    Args:
        space: a validated search space (``rm_sweep.spaces.load_space``).
        store: the store or its URI.
        address: Ray cluster to join (``auto``, ``ray://...``); None starts a local instance
            (or uses the one this process already started).
        num_cpus: CPUs of a local instance (default: the machine's).
        cpus_per_trial, gpus_per_trial: override the space's resources; a fraction of a GPU
            lets several small models share one card.
        max_concurrent: trials at once (default: the space's, else what the cluster's CPUs and
            GPUs hold now, else unlimited so an autoscaler sees the whole demand).
        resume: restore the previous run of this space with ``Tuner.restore`` (finished trials
            stay finished); models still missing afterwards get a fresh run.
        data_dir: where workers find and cache data sets (default ``rm_sweep.data``'s).
        compile: ``fit``'s ``compile`` for every trial (default: on for trials with a GPU).
        verbose: Tune's verbosity (0 silent, 1 progress table, 2 everything).
    """
    started = time.perf_counter()
    store = Store(store) if not isinstance(store, Store) else store
    resources = dataclasses.replace(
        space.resources,
        **{k: v for k, v in (("cpus_per_trial", cpus_per_trial), ("gpus_per_trial", gpus_per_trial)) if v is not None})
    if resources.cpus_per_trial <= 2 * TRIAL_CPU or resources.gpus_per_trial < 0:
        raise UserError(f"cpus per trial must be > {2 * TRIAL_CPU:g} and gpus per trial >= 0")
    if address is None and resources.gpus_per_trial > 0 and not torch.cuda.is_available():
        # A local instance has no GPU to give: the trials would wait for one forever.
        raise UserError(f"{space.name} asks for {resources.gpus_per_trial:g} GPU per trial and this machine has none; "
                        "pass --gpus-per-trial 0 to train on the CPU")
    specs = space.models()
    stored = store.model_ids()
    result = SweepResult(skipped=[s.model_id for s in specs if s.model_id in stored])
    pending = [s for s in specs if s.model_id not in stored]
    run_path = store.location(RUN_DIR)
    experiment = f"sweep-{space.name}"
    if pending:
        t0 = time.perf_counter()
        with ray_session(address, num_cpus=num_cpus, log_to_driver=verbose >= 2) as started_ray:
            if started_ray:
                result.ray_init_seconds = time.perf_counter() - t0
            if address is None:
                _warm_data_cache(space, pending[0], data_dir)
            trainable = _trainable(_trial_config(space, store, resources, data_dir, run_path, compile))
            if resume and ray.tune.Tuner.can_restore(_join(run_path, experiment)):
                _fit(ray.tune.Tuner.restore(_join(run_path, experiment), trainable, resume_unfinished=True,
                                            resume_errored=True), result)
                pending = [s for s in specs if not store.has_model(s.model_id)]
            if pending:
                concurrency = (max_concurrent or resources.max_concurrent_trials
                               or trials_that_fit(ray.cluster_resources(), resources))
                _fit(_new_tuner(trainable, space, pending, resources, run_path, experiment, concurrency, verbose),
                     result)
    stored = store.model_ids()
    result.trained = [s.model_id for s in specs if s.model_id in stored and s.model_id not in result.skipped]
    result.unfinished = [s.model_id for s in specs if s.model_id not in stored and s.model_id not in result.failed]
    store.add_ensembles(space.ensembles())
    result.seconds = time.perf_counter() - started
    return result


def _join(base: str, name: str) -> str:
    """``base`` (a local path or a URI, maybe with a query) with ``/name`` appended to its path."""
    path, sep, query = base.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


def _warm_data_cache(space: SearchSpace, spec: ModelSpec, data_dir: str | os.PathLike | None) -> None:
    """Decode the data set once here, before trials start, so parallel workers on this machine
    read the cache instead of each decoding it (and a bad data spec fails before any trial)."""
    load_dataset(space.data, data_dir=data_dir, train_subset=spec.train_subset, test_subset=spec.test_subset)


def trials_that_fit(total: Mapping[str, float], resources: Resources) -> int | None:
    """Trials of ``resources`` that ``total`` CPUs and GPUs (``ray.cluster_resources()``) hold at
    once; None if none fit yet (an autoscaling cluster starting from zero workers: let it see
    every trial's demand)."""
    fits = [math.floor(total.get("CPU", 0) / resources.cpus_per_trial + 1e-9)]
    if resources.gpus_per_trial > 0:
        fits.append(math.floor(total.get("GPU", 0) / resources.gpus_per_trial + 1e-9))
    return min(fits) or None


def _trial_config(space: SearchSpace, store: Store, resources: Any, data_dir: Any, run_path: str,
                  compile: bool | None) -> dict[str, Any]:
    """Everything a trial needs besides its model: passed once through Ray's object store."""
    fault = os.environ.get(FAULT_ENV)
    return {
        "specs": {s.model_id: s.to_dict() for s in space.models()},
        # Absolute locations: Ray runs trials and workers in their own working directories.
        "data": _absolute_data(space.data),
        "data_dir": None if data_dir is None else os.path.abspath(data_dir),
        "store": store.location(),
        "train_storage": _join(run_path, "train"),
        "cpus": resources.cpus_per_trial,
        "gpus": resources.gpus_per_trial,
        "max_failures": resources.max_failures,
        "worker_env": {FAULT_ENV: fault} if fault else {},
        "compile": compile,
    }


def _absolute_data(text: str) -> str:
    spec = parse_data_spec(text)
    return text if spec.path is None else f"{spec.kind}:{os.path.abspath(os.path.expanduser(spec.path))}"


def _trainable(config: dict[str, Any]) -> Any:
    return ray.tune.with_resources(ray.tune.with_parameters(_trial, setup=config), {"cpu": TRIAL_CPU})


def _new_tuner(trainable: Any, space: SearchSpace, pending: list[ModelSpec], resources: Any, run_path: str,
               experiment: str, concurrency: int | None, verbose: int) -> ray.tune.Tuner:
    return ray.tune.Tuner(
        trainable,
        # One trial per model; Tune's table shows the id as the "model" column and the
        # model's description as the trial name.
        param_space={"model": ray.tune.grid_search([s.model_id for s in pending])},
        tune_config=ray.tune.TuneConfig(
            max_concurrent_trials=concurrency, reuse_actors=True, trial_dirname_creator=_trial_dirname,
            trial_name_creator=functools.partial(_trial_name, {s.model_id: s.label for s in space.models()})),
        run_config=ray.tune.RunConfig(
            name=experiment, storage_path=run_path, verbose=verbose,
            # A trial whose own process dies (its node removed) is retried; its Train run resumes.
            failure_config=ray.tune.FailureConfig(max_failures=resources.max_failures),
        ),
    )


def _trial_name(labels: dict[str, str], trial: Any) -> str:
    model_id = trial.config["model"]
    return f"{labels.get(model_id, 'model')} ({model_id[:8]})"


def _trial_dirname(trial: Any) -> str:
    return f"{trial.config['model']}-{trial.trial_id}"


def _fit(tuner: ray.tune.Tuner, result: SweepResult) -> None:
    grid = tuner.fit()
    for trial in grid:
        model_id = trial.config["model"]
        if trial.error is not None:
            result.failed[model_id] = " ".join(str(trial.error).split())[:500]
            continue
        history = trial.metrics_dataframe
        if history is not None and "epoch" in history:
            # The trial's own closing summary (with trial_seconds) repeats the last epoch.
            epochs = history[history["trial_seconds"].isna()] if "trial_seconds" in history else history
            result.epochs_reported[model_id] = [int(e) for e in epochs["epoch"].dropna()]
        if trial.metrics and "trial_seconds" in trial.metrics:
            m = trial.metrics
            result.timings[model_id] = TrialTiming(m["startup_seconds"], m["setup_seconds"], m["train_seconds"],
                                                   m["trial_seconds"])


def _trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune function: one model, trained by a one-worker ``TorchTrainer`` unless already stored."""
    t0 = time.time()
    model_id = config["model"]
    if model_id not in setup["specs"]:
        raise UserError(f"model {model_id} is not in the search space any more; run without --resume")
    spec = ModelSpec.from_dict(setup["specs"][model_id])
    store = Store(setup["store"])
    if store.has_model(spec.model_id):  # a restored trial whose model was finished meanwhile
        ray.tune.report({"epoch": spec.recipe_config().epochs, "stored": True})
        return
    gpus = setup["gpus"]
    trainer = TorchTrainer(
        _worker,
        train_loop_config={**setup, "spec": spec.to_dict(), "specs": None},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=gpus > 0,
            resources_per_worker={"CPU": setup["cpus"] - TRIAL_CPU, **({"GPU": gpus} if gpus > 0 else {})}),
        run_config=ray.train.RunConfig(
            name=spec.model_id, storage_path=setup["train_storage"],
            failure_config=ray.train.FailureConfig(max_failures=setup["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": setup["worker_env"]} if setup["worker_env"] else None,
        ),
    )
    metrics = trainer.fit().metrics or {}  # fit() raises if training failed after max_failures retries
    if not store.has_model(spec.model_id):
        raise RuntimeError(f"training of {spec.model_id} ended without storing the model")
    # The model is stored: its training state is of no further use.
    fs, path = resolve_uri(_join(setup["train_storage"], spec.model_id))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    ray.tune.report({
        "epoch": metrics.get("epoch", spec.recipe_config().epochs), "test_accuracy": metrics.get("test_accuracy"),
        "train_seconds": metrics.get("train_seconds", 0.0),
        "startup_seconds": metrics.get("worker_started_at", t0) - t0, "setup_seconds": metrics.get("setup_seconds", 0.0),
        "trial_seconds": time.time() - t0,
    })


@dataclass(frozen=True)
class _Fault:
    epoch: int
    marker: Path


def _fault(model_id: str) -> _Fault | None:
    """The ``FAULT_ENV`` instruction for this model, if any and not yet carried out."""
    text = os.environ.get(FAULT_ENV, "")
    target, _, rest = text.partition(":")
    epoch, _, marker = rest.partition(":")
    if target != model_id or not marker or Path(marker).exists():
        return None
    return _Fault(int(epoch), Path(marker))


def _worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: restore, ``fit`` with a report per epoch, store the model."""
    started = time.time()
    spec = ModelSpec.from_dict(config["spec"])
    torch.set_num_threads(max(1, round(config["cpus"])))  # the trial's cores
    device = ray.train.torch.get_device() if config["gpus"] > 0 else torch.device("cpu")
    data = load_dataset(config["data"], data_dir=config["data_dir"], train_subset=spec.train_subset,
                        test_subset=spec.test_subset)
    # fit() checks a resumed state against the data's name: use the location-free identity so
    # a trial resumed on a machine with the data at another path is accepted.
    data = dataclasses.replace(data, name=spec.data)
    model = spec.create(data)
    setup_seconds = time.time() - started
    fault = _fault(spec.model_id)
    state_dir = Path(tempfile.mkdtemp(prefix=f"rm_sweep-{spec.model_id}-"))
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(state_dir))

        def report(metrics: dict[str, Any], directory: Path | None) -> None:
            if fault is not None and metrics["epoch"] == fault.epoch:
                fault.marker.touch()
                os._exit(1)  # as a killed worker: this epoch's work is lost, the last checkpoint is not
            shown = {k: metrics[k] for k in _SHOWN_FIRST}
            ray.train.report({**shown, **metrics, "setup_seconds": setup_seconds, "worker_started_at": started},
                             checkpoint=ray.train.Checkpoint.from_directory(str(directory)))

        final = fit(model, data, spec.recipe_config(), report, state_dir=state_dir, device=device, seed=spec.seed,
                    compile=config["compile"])
        if ray.train.get_context().get_world_rank() == 0:
            Store(config["store"]).add_model(spec, final, model.cpu())
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
