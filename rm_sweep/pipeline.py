"""The pipeline: what a search space still needs from a store, and running exactly that.

    train(space, store)       # every model of the space the store lacks (Ray Tune + Ray Train)
    complete(space, store)    # that, then every matrix cell the store lacks (crafting tasks + actors)
    model_status(space, store), cell_status(space, store)   # what a run would do (--dry-run)

"What is missing" is asked of the store (``Store.missing``, ``missing_cells``) before Ray is even
imported: a store that holds everything answers in a second and starts nothing. When there is
work, the store is checked to be writable and, for a local run, the data set loaded (decoded once
for all its workers) before Ray starts, so a read-only store or bad data costs seconds, not a
cluster's startup. The Ray layer (``rm_sweep.orchestration``) is imported only then, inside one
Ray session.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import pandas as pd
import torch

from rm_sweep.data import load_dataset
from rm_sweep.errors import UserError
from rm_sweep.leases import Leases, Owner
from rm_sweep.orchestration.values import TRIAL_CPU, MatrixOptions, MatrixReport, SweepResult
from rm_sweep.spaces import SearchSpace
from rm_sweep.spec import MatrixCell
from rm_sweep.store import NOT_STORED, Store


def missing_cells(space: SearchSpace, store: Store) -> list[MatrixCell]:
    """The space's matrix cells that the store does not hold, in file order."""
    stored = store.matrix_keys()
    return [c for c in space.cells if c.key() not in stored]


def model_status(space: SearchSpace, store: Store, result: SweepResult | None = None) -> pd.DataFrame:
    """One row per model of ``space``: ``model_id``, ``model`` (its label), ``status`` and the
    stored ``clean_accuracy`` and ``train_seconds`` (NaN when not stored). The status is what the
    store (and ``result``, the sweep that just ran, if any) says: ``stored``, ``missing``,
    ``damaged`` (a row without a usable checkpoint), ``failed`` or ``leased`` (another run is
    training it)."""
    unusable = store.unusable([s.model_id for s in space.models()])
    stored = store.models().set_index("model_id")
    result = result or SweepResult()
    rows = []
    for spec in space.models():
        model_id = spec.model_id
        status = "stored" if model_id not in unusable else "failed" if model_id in result.failed else \
            "leased" if model_id in result.leased else "missing" if unusable[model_id] == NOT_STORED else "damaged"
        row = stored.loc[model_id] if status == "stored" else None
        rows.append({"model_id": model_id, "model": spec.label, "status": status,
                     "clean_accuracy": math.nan if row is None else row.clean_accuracy,
                     "train_seconds": math.nan if row is None else row.train_seconds})
    return pd.DataFrame(rows, columns=["model_id", "model", "status", "clean_accuracy", "train_seconds"])


def cell_status(space: SearchSpace, store: Store) -> pd.DataFrame:
    """One row per matrix cell of ``space``, in file order: ``protocol``, ``attack``, ``source``
    and ``target`` (labels; ``-`` for no source), ``limit`` and ``status`` (``stored`` or
    ``missing``, by ``missing_cells``)."""
    missing = {c.key() for c in missing_cells(space, store)}
    names = {s.model_id: s.label for s in space.models()} | {e.ensemble_id: e.label for e in space.ensembles()}
    rows = [{"protocol": c.protocol, "attack": c.attack,
             "source": names.get(c.source_id, c.source_id) if c.source_id else "-",
             "target": names.get(c.target_id, c.target_id), "limit": c.limit,
             "status": "missing" if c.key() in missing else "stored"} for c in space.cells]
    return pd.DataFrame(rows, columns=["protocol", "attack", "source", "target", "limit", "status"])


def matrix_images(space: SearchSpace, data_dir: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images the space's models were evaluated on, in attack order: uint8 (N, C, H, W)
    and int64 labels (N,). Cells' limits count from the first of them."""
    test_subsets = {m.test_subset for m in space.models()}
    if len(test_subsets) != 1:
        raise UserError(f"{space.path}: models use different test subsets {sorted(test_subsets, key=str)}; "
                        "the matrix needs one test set")
    # The test subset does not depend on the training subset; passing the models' own keeps the
    # (unused) training arrays as small as theirs.
    first = space.models()[0]
    data = load_dataset(space.data, data_dir=data_dir, train_subset=first.train_subset,
                        test_subset=first.test_subset)
    return data.test_x, data.test_y


def train(
    space: SearchSpace,
    store: Store,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    max_concurrent: int | None = None,
    data_dir: str | os.PathLike | None = None,
    compile: bool | None = None,
    verbose: int = 1,
    mlflow: str | None = None,
) -> SweepResult:
    """Train every model of ``space`` that ``store`` cannot serve (``Store.unusable``: no row, or
    a checkpoint missing or damaged) and that no other live run is training (``rm_sweep.leases``),
    and record the space's ensembles.

    Args:
        space: a validated search space. store: where models land.
        address: Ray cluster to join (``auto``, ``ray://...``); None starts a private local
            instance (or uses the one this process is connected to).
        num_cpus: CPUs of a local instance (default: the machine's).
        cpus_per_trial, gpus_per_trial: override the space's resources; a fraction of a GPU lets
            several small models share one card.
        max_concurrent: trials at once (default: the space's, else what the cluster holds).
        data_dir: where workers find and cache data sets. compile: ``fit``'s ``compile``.
        verbose: 0 silent, 1 one progress bar, 2 Tune's table instead of the bar, and everything
            Ray's processes print (otherwise kept in Ray's session folder).
        mlflow: an MLflow tracking URI to log each trial's spec and per-epoch metrics to.
    """
    started = time.perf_counter()
    resources = dataclasses.replace(
        space.resources,
        **{k: v for k, v in (("cpus_per_trial", cpus_per_trial), ("gpus_per_trial", gpus_per_trial)) if v is not None})
    specs = space.models()
    unusable = store.unusable([s.model_id for s in specs])
    pending = [s for s in specs if s.model_id in unusable]
    result = SweepResult()
    if pending:
        if resources.cpus_per_trial <= 2 * TRIAL_CPU or resources.gpus_per_trial < 0:
            raise UserError(f"cpus per trial must be > {2 * TRIAL_CPU:g} and gpus per trial >= 0")
        if address is None and resources.gpus_per_trial > 0 and not torch.cuda.is_available():
            # A local instance has no GPU to give: the trials would wait for one forever.
            raise UserError(f"{space.name} asks for {resources.gpus_per_trial:g} GPU per trial and this machine has "
                            "none; pass --gpus-per-trial 0 to train on the CPU")
        store.check_writable()
        if address is None:
            # Decode the data set once here, before trials start, so parallel workers on this
            # machine read the cache instead of each decoding it (and bad data fails first).
            load_dataset(space.data, data_dir=data_dir, train_subset=pending[0].train_subset,
                         test_subset=pending[0].test_subset)
        owner = Owner.new()
        removed = tidy(store, Leases(store.files, owner))
        from rm_sweep.orchestration.session import ray_session
        from rm_sweep.orchestration.trials import TrialSetup, run_trials

        t0 = time.perf_counter()
        with ray_session(address, num_cpus=num_cpus, log_to_driver=verbose >= 2) as started_ray:
            init_seconds = time.perf_counter() - t0 if started_ray else 0.0
            setup = TrialSetup.of(space.data, store, resources, data_dir=data_dir, compile=compile, owner=owner)
            result = run_trials(pending, store, setup, name=f"sweep-{space.name}", max_concurrent=max_concurrent,
                                fixed_size=started_ray, verbose=verbose, mlflow=mlflow)
        result.ray_init_seconds = init_seconds
        result.removed_states = removed
    result.damaged = {m: reason for m, reason in unusable.items() if reason != NOT_STORED}
    result.skipped = [s.model_id for s in specs if s not in pending] + result.skipped
    store.add_ensembles(space.ensembles())
    result.seconds = time.perf_counter() - started
    return result


def tidy(store: Store, leases: Leases) -> list[str]:
    """Delete what no live run owns and no run will resume: the training state (``_ray/train``)
    of models the store holds, and stale leases of stored models. Returns the model ids whose
    training state was deleted. The training state of a model that is not stored is kept: the
    run that trains it next resumes it (``rm_sweep.orchestration.trials``)."""
    runs = store.training_runs()
    unusable = store.unusable(runs)
    removed = []
    for model_id in runs:
        if model_id not in unusable and leases.held_elsewhere(model_id) is None:
            store.remove_training_state(model_id)
            removed.append(model_id)
    for lease in leases.all():
        if not lease.live() and store.has_model(lease.model_id):
            leases.remove_stale(lease)
    return removed


@dataclass
class Completion:
    """What ``complete`` did: models trained (``damaged``: stored models trained again, and why),
    the matrix run (None when no cell was missing) and whether Ray was started."""

    models_trained: int = 0
    damaged: dict[str, str] = field(default_factory=dict)
    matrix: MatrixReport | None = None
    started_ray: bool = False
    seconds: float = 0.0


def complete(space: SearchSpace, store: Store, *, address: str | None = None,
             data_dir: str | os.PathLike | None = None, options: MatrixOptions | None = None, verbose: int = 1,
             mlflow: str | None = None) -> Completion:
    """Train the space's missing models, record its ensembles and compute its missing matrix
    cells, on a private local Ray instance (``address`` None) or the cluster at ``address``.
    ``verbose`` and ``mlflow`` as for ``train``; the matrix shows a bar of cells unless 0.

    Nothing is started when the store already holds everything.
    """
    start = time.perf_counter()
    done = Completion()
    cells = missing_cells(space, store)
    if not store.missing(space.models()) and not cells:
        store.add_ensembles(space.ensembles())  # members may have come from other spaces' sweeps
        done.seconds = time.perf_counter() - start
        return done
    store.check_writable()
    images = matrix_images(space, data_dir) if cells else None  # bad data fails before Ray starts
    from rm_sweep.orchestration.attack_matrix import run_matrix
    from rm_sweep.orchestration.session import ray_session

    with ray_session(address, log_to_driver=verbose >= 2):
        done.started_ray = True
        swept = train(space, store, address=address, data_dir=data_dir, verbose=verbose, mlflow=mlflow)
        done.models_trained, done.damaged = len(swept.trained), swept.damaged
        if not swept.ok:
            raise UserError(f"the sweep did not train {len(swept.failed) + len(swept.unfinished)} model(s) "
                            f"({', '.join([*swept.failed, *swept.unfinished])}); their errors are shown above"
                            if not swept.leased else
                            f"{len(swept.leased)} model(s) are being trained by another run "
                            f"({', '.join(swept.leased)}); run this again once it is done")
        if images is not None:
            ensembles = {e.ensemble_id: e.member_ids for e in space.ensembles()}
            done.matrix = run_matrix(cells, store, *images, ensembles, options or MatrixOptions(), progress=verbose > 0)
    done.seconds = time.perf_counter() - start
    return done


__all__ = ["Completion", "cell_status", "complete", "matrix_images", "missing_cells", "model_status", "tidy", "train"]
