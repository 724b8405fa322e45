"""What the driver shows of a sweep: Tune's callbacks and the console.

``Collector`` records every trial's reports, timing and failure (Tune's result files are never
read) and draws the sweep's one progress bar; ``tune_console`` keeps Tune's own printing off the
console unless ``--verbose``; ``mlflow_callbacks`` adds MLflow tracking when asked.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray.tune
from tqdm import tqdm

from rm_sweep.errors import UserError
from rm_sweep.orchestration.session import quiet_logger
from rm_sweep.orchestration.values import TrialTiming
from rm_sweep.spec import ModelSpec


@contextlib.contextmanager
def tune_console(verbose: int) -> Iterator[None]:
    """Tune prints its experiment header and a TensorBoard hint at every verbosity, and warns of
    its own bookkeeping taking long (on a busy machine, often): below 2 they go nowhere, and the
    progress bar (on stderr) is the whole console."""
    if verbose >= 2:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), quiet_logger("ray.tune.utils.util"):
        yield


def mlflow_callbacks(uri: str | None, experiment: str) -> list[ray.tune.Callback]:
    """Tune's ``MLflowLoggerCallback`` for tracking URI ``uri`` (none without one): each trial's
    config (its model's spec) as params, its reports as metrics, in experiment ``experiment``."""
    if uri is None:
        return []
    try:
        import mlflow  # noqa: F401  (the callback imports it only when the run starts)
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError:
        raise UserError("--mlflow needs MLflow: pip install 'rm_sweep[mlflow]'") from None
    if "://" not in uri or uri.startswith("file:"):
        # MLflow 3 refuses a folder (file store) unless told it is wanted; naming one is telling it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, save_artifact=False)]


_EPOCH_METRICS = ("epoch", "train_loss", "train_accuracy", "test_accuracy", "images_per_second", "lr",
                  "epoch_seconds", "train_seconds")


class Collector(ray.tune.Callback):
    """Driver-side record of every trial's reports, timing and failure (Tune's result files are
    neither needed nor read), and the sweep's one progress bar: epochs done of all the models'
    epochs, the last model's epoch and test accuracy, and tqdm's ETA."""

    def __init__(self, specs: Sequence[ModelSpec], *, progress: bool) -> None:
        self.epochs: dict[str, list[int]] = {}
        self.epoch_metrics: dict[str, list[dict[str, float]]] = {}
        self.timings: dict[str, TrialTiming] = {}
        self.failed: dict[str, str] = {}
        self.leased: dict[str, str] = {}
        self.stored: set[str] = set()
        self.restarted: dict[str, str] = {}
        self.labels = {s.model_id: s.label for s in specs}
        self.total_epochs, self.progress = sum(s.recipe_config().epochs for s in specs), progress
        self.bar: tqdm | None = None

    def setup(self, **info: Any) -> None:
        # Made here, not in __init__: Tune pickles its callbacks first, and a bar holds the console.
        self.bar = tqdm(total=self.total_epochs, desc=f"training {len(self.labels)} model(s)", unit="epoch",
                        disable=not self.progress, dynamic_ncols=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        model_id = model_id_of(trial)
        if "leased_by" in result:
            self.leased[model_id] = result["leased_by"]
        if result.get("stored"):
            self.stored.add(model_id)
        if "error" in result:  # the worker's own message first; the trial's summary after it
            self.failed.setdefault(model_id, result["error"])
        if "restarted" in result:
            self.restarted[model_id] = result["restarted"]
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
        # error.txt (text, in the driver-local Tune directory): the last line names the exception.
        error = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).exists() else ""
        lines = [line.strip() for line in error.splitlines() if line.strip()]
        self.failed[model_id_of(trial)] = lines[-1][:500] if lines else "the trial failed"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def model_id_of(trial: Any) -> str:
    """The model a trial trains (its config is the model's spec with its id)."""
    return trial.config["model"]["model_id"]


__all__ = ["Collector", "mlflow_callbacks", "model_id_of", "tune_console"]
