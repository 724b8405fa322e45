"""Training on Ray: one Ray Tune trial per model, a Ray Train ``TorchTrainer`` inside each trial.

    result = run_trials(specs, store, TrialSetup.of(space, store, data_dir=None, compile=None))

Per model the Tune function ``_trial`` builds a ``TorchTrainer`` (Ray Train V2) with one worker
whose loop (``_worker``) restores the training state from ``ray.train.get_checkpoint()``, calls
``rm_sweep.train.fit`` and, after every epoch, reports the metrics with the state directory as
a checkpoint; ``TuneReportCallback`` forwards them to Tune. Train's checkpoints live in the
store's run storage (``Store.run_location``: shared storage on a cluster), so a worker that dies
is restarted from its last epoch (``FailureConfig``), and a model whose sweep is run again
continues its Train run, which is named after the model id. The worker writes the finished model
to the store, once: the store's files are named by model id.

Tune's own state (its experiment files, pickled trial errors) stays in a driver-local temporary
directory and is never read back: nothing written to a shared store is unpickled. What the sweep
reports comes from a driver-side callback (``_Collector``), not from Tune's result files; it also
draws the console's one progress bar (model, epoch, accuracy, ETA) unless Ray's own output is asked
for. Each trial's config is its model's spec, so an ``MLflowLoggerCallback`` (``mlflow=``) logs it
with the per-epoch metrics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from tqdm import tqdm

from rm_sweep.data import load_dataset
from rm_sweep.errors import UserError
from rm_sweep.orchestration import faults
from rm_sweep.orchestration.session import quiet_logger
from rm_sweep.orchestration.values import SweepResult, TrialTiming
from rm_sweep.spaces import Resources
from rm_sweep.spec import ModelSpec, parse_data_spec
from rm_sweep.store import Store
from rm_sweep.train import fit

# The Tune function only waits for its trainer (Ray rejects 0 CPUs). Its share comes out of the
# trial's cpus_per_trial, so N trials of c CPUs fill N * c CPUs exactly: with the share on top,
# 2 trials of 1 CPU would not fit 2 CPUs and the second worker would wait for the first.
TRIAL_CPU = 0.01
# Columns of Tune's progress table come from the first metrics of each report.
_SHOWN_FIRST = ("epoch", "test_accuracy", "train_accuracy", "train_loss")


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs besides its model; passed once through Ray's object store.

    Attributes:
        data: where the data set is loaded from (``folder:`` paths absolute: Ray runs trials in
            their own working directories).
        data_dir: where workers find and cache data sets (absolute, or None for the default).
        store: the store's location. resources: what each trial asks for.
        compile: ``fit``'s ``compile`` for every trial (None: on for trials with a GPU).
    """

    data: str
    data_dir: str | None
    store: str
    resources: Resources
    compile: bool | None

    @classmethod
    def of(cls, data: str, store: Store, resources: Resources, *, data_dir: str | os.PathLike | None,
           compile: bool | None) -> TrialSetup:
        spec = parse_data_spec(data)
        absolute = data if spec.path is None else f"{spec.kind}:{os.path.abspath(os.path.expanduser(spec.path))}"
        return cls(absolute, None if data_dir is None else os.path.abspath(data_dir), store.location(), resources,
                   compile)

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
        verbose: 0 silent, 1 one progress bar, 2 Tune's table and everything Ray prints.
        mlflow: an MLflow tracking URI: each trial's spec and per-epoch metrics are logged there
            (the optional extra ``rm_sweep[mlflow]``); the store stays the source of truth.
    Returns:
        ``trained``, ``failed``, ``unfinished``, ``epochs_reported`` and ``timings`` of ``specs``.
    """
    resources = setup.resources
    fits = trials_that_fit(ray.cluster_resources(), resources)
    concurrency = max_concurrent or resources.max_concurrent_trials or fits
    if fixed_size:
        concurrency = min(concurrency or 1, fits or 1)
    collector = _Collector(specs, progress=verbose == 1)
    callbacks: list[ray.tune.Callback] = [collector, *_mlflow_callbacks(mlflow, name)]
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
                trial_name_creator=functools.partial(_trial_name, {s.model_id: s.label for s in specs})),
            run_config=ray.tune.RunConfig(
                name=name, storage_path=tune_dir, verbose=2 if verbose >= 2 else 0, callbacks=callbacks,
                # A trial whose own process dies (its node removed) is retried; its Train run resumes.
                failure_config=ray.tune.FailureConfig(max_failures=resources.max_failures),
            ),
        )
        with _tune_console(verbose):
            tuner.fit()
    finally:
        collector.close()
        shutil.rmtree(tune_dir, ignore_errors=True)
    stored = store.model_ids()
    return SweepResult(
        trained=[s.model_id for s in specs if s.model_id in stored],
        failed={k: v for k, v in collector.failed.items() if k not in stored},
        unfinished=[s.model_id for s in specs if s.model_id not in stored and s.model_id not in collector.failed],
        timings=collector.timings, epochs_reported=collector.epochs,
        epoch_metrics=collector.epoch_metrics)


@contextlib.contextmanager
def _tune_console(verbose: int) -> Iterator[None]:
    """Tune prints its experiment header and a TensorBoard hint at every verbosity, and warns of
    its own bookkeeping taking long (on a busy machine, often): below 2 they go nowhere, and the
    progress bar (on stderr) is the whole console."""
    if verbose >= 2:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), quiet_logger("ray.tune.utils.util"):
        yield


def _mlflow_callbacks(uri: str | None, experiment: str) -> list[ray.tune.Callback]:
    if uri is None:
        return []
    try:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        import mlflow  # noqa: F401  (the callback imports it only when the run starts)
    except ImportError:
        raise UserError("--mlflow needs MLflow: pip install 'rm_sweep[mlflow]'") from None
    if "://" not in uri or uri.startswith("file:"):
        # MLflow 3 refuses a folder (file store) unless told it is wanted; naming one is telling it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, save_artifact=False)]


_EPOCH_METRICS = ("epoch", "train_loss", "train_accuracy", "test_accuracy", "images_per_second", "lr",
                  "epoch_seconds", "train_seconds")


class _Collector(ray.tune.Callback):
    """Driver-side record of every trial's reports, timing and failure (Tune's result files are
    neither needed nor read), and the sweep's one progress bar: epochs done of all the models'
    epochs, the last model's epoch and test accuracy, and tqdm's ETA."""

    def __init__(self, specs: Sequence[ModelSpec], *, progress: bool) -> None:
        self.epochs: dict[str, list[int]] = {}
        self.epoch_metrics: dict[str, list[dict[str, float]]] = {}
        self.timings: dict[str, TrialTiming] = {}
        self.failed: dict[str, str] = {}
        self.labels = {s.model_id: s.label for s in specs}
        self.total_epochs, self.progress = sum(s.recipe_config().epochs for s in specs), progress
        self.bar: tqdm | None = None

    def setup(self, **info: Any) -> None:
        # Made here, not in __init__: Tune pickles its callbacks first, and a bar holds the console.
        self.bar = tqdm(total=self.total_epochs, desc=f"training {len(self.labels)} model(s)", unit="epoch",
                        disable=not self.progress, dynamic_ncols=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        model_id = _model_id(trial)
        if "trial_seconds" in result:  # the trial's closing summary, which repeats the last epoch
            self.timings[model_id] = TrialTiming(result["startup_seconds"], result["setup_seconds"],
                                                 result["train_seconds"], result["trial_seconds"])
        elif "epoch" in result:
            epoch, done = int(result["epoch"]), self.epochs.setdefault(model_id, [])
            # A trial resumed from an earlier run reports from its checkpoint's epoch on, a restarted
            # worker may repeat one: the bar counts each epoch once.
            if self.bar is not None:
                self.bar.update(max(0, epoch - max(done, default=0)))
            done.append(epoch)
            self.epoch_metrics.setdefault(model_id, []).append(
                {k: float(v) for k, v in result.items() if k in _EPOCH_METRICS})
            if self.bar is not None and "test_accuracy" in result:
                self.bar.set_postfix_str(f"{self.labels.get(model_id, model_id)} epoch {result['epoch']}, "
                                         f"test accuracy {100 * result['test_accuracy']:.1f} %")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).exists() else ""
        self.failed[_model_id(trial)] = " ".join(error.split())[:500] or "the trial failed"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _model_id(trial: Any) -> str:
    return trial.config["model"]["model_id"]


def _trial_name(labels: dict[str, str], trial: Any) -> str:
    model_id = _model_id(trial)
    return f"{labels.get(model_id, 'model')} ({model_id[:8]})"


def _trial_dirname(trial: Any) -> str:
    return f"{_model_id(trial)}-{trial.trial_id}"


def _trial(config: dict[str, Any], setup: TrialSetup, specs: Mapping[str, ModelSpec]) -> None:
    """Tune function: one model, trained by a one-worker ``TorchTrainer`` unless already stored."""
    t0 = time.time()
    spec = specs[config["model"]["model_id"]]
    store = Store(setup.store)
    if store.has_model(spec.model_id):  # a retried trial whose model was finished meanwhile
        ray.tune.report({"epoch": spec.recipe_config().epochs, "stored": True})
        return
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
    metrics = trainer.fit().metrics or {}  # fit() raises if training failed after max_failures retries
    if not store.has_model(spec.model_id):
        raise RuntimeError(f"training of {spec.model_id} ended without storing the model")
    store.remove_training_state(spec.model_id)
    ray.tune.report({
        "epoch": metrics.get("epoch", spec.recipe_config().epochs), "test_accuracy": metrics.get("test_accuracy"),
        "train_seconds": metrics.get("train_seconds", 0.0),
        "startup_seconds": metrics.get("worker_started_at", t0) - t0, "setup_seconds": metrics.get("setup_seconds", 0.0),
        "trial_seconds": time.time() - t0,
    })


def _worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: restore, ``fit`` with a report per epoch, store the model."""
    started = time.time()
    setup: TrialSetup = config["setup"]
    spec: ModelSpec = config["spec"]
    torch.set_num_threads(max(1, round(setup.resources.cpus_per_trial)))  # the trial's cores
    gpu = setup.resources.gpus_per_trial > 0
    device = ray.train.torch.get_device() if gpu else torch.device("cpu")
    data = load_dataset(setup.data, data_dir=setup.data_dir, train_subset=spec.train_subset,
                        test_subset=spec.test_subset)
    # fit() checks a resumed state against the data's name: use the location-free identity so
    # a trial resumed on a machine with the data at another path is accepted.
    data = dataclasses.replace(data, name=spec.data)
    model = spec.create(data)
    setup_seconds = time.time() - started
    state_dir = Path(tempfile.mkdtemp(prefix=f"rm_sweep-{spec.model_id}-"))
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(state_dir))

        def report(metrics: dict[str, Any], directory: Path | None) -> None:
            faults.inject("epoch", f"{spec.model_id}/{metrics['epoch']}")
            shown = {k: metrics[k] for k in _SHOWN_FIRST}
            ray.train.report({**shown, **metrics, "setup_seconds": setup_seconds, "worker_started_at": started},
                             checkpoint=ray.train.Checkpoint.from_directory(str(directory)))

        final = fit(model, data, spec.recipe_config(), report, state_dir=state_dir, device=device, seed=spec.seed,
                    compile=setup.compile)
        if ray.train.get_context().get_world_rank() == 0:
            Store(setup.store).add_model(spec, final, model.cpu())
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


__all__ = ["TRIAL_CPU", "TrialSetup", "run_trials", "trials_that_fit"]
