"""The pipeline: what a search space still needs from a store, and running exactly that.

    train(space, store)       # every model of the space the store lacks (Ray Tune + Ray Train)
    complete(space, store)    # that, then every matrix cell the store lacks (crafting tasks + actors)

"What is missing" is asked of the store (``Store.missing``, ``missing_cells``) before Ray is even
imported: a store that holds everything answers in a second and starts nothing. The Ray layer
(``rm_sweep.orchestration``) is imported only when there is work, inside one Ray session.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from rm_sweep.data import load_dataset
from rm_sweep.errors import UserError
from rm_sweep.orchestration.values import MatrixOptions, MatrixReport, SweepResult
from rm_sweep.spaces import SearchSpace
from rm_sweep.spec import MatrixCell
from rm_sweep.store import Store


def missing_cells(space: SearchSpace, store: Store) -> list[MatrixCell]:
    """The space's matrix cells that the store does not hold, in file order."""
    stored = store.matrix_keys()
    return [c for c in space.cells if c.key() not in stored]


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
    """Train every model of ``space`` that ``store`` lacks and record the space's ensembles.

    Args:
        space: a validated search space. store: where models land.
        address: Ray cluster to join (``auto``, ``ray://...``); None starts a private local
            instance (or uses the one this process is connected to).
        num_cpus: CPUs of a local instance (default: the machine's).
        cpus_per_trial, gpus_per_trial: override the space's resources; a fraction of a GPU lets
            several small models share one card.
        max_concurrent: trials at once (default: the space's, else what the cluster holds).
        data_dir: where workers find and cache data sets. compile: ``fit``'s ``compile``.
        verbose: 0 silent, 1 one progress bar, 2 also Tune's table and everything Ray's processes
            print (otherwise kept in Ray's session folder).
        mlflow: an MLflow tracking URI to log each trial's spec and per-epoch metrics to.
    """
    started = time.perf_counter()
    resources = dataclasses.replace(
        space.resources,
        **{k: v for k, v in (("cpus_per_trial", cpus_per_trial), ("gpus_per_trial", gpus_per_trial)) if v is not None})
    specs = space.models()
    pending = store.missing(specs)
    if pending:
        from rm_sweep.orchestration.session import ray_session
        import ray

        from rm_sweep.orchestration.trials import TRIAL_CPU, TrialSetup, run_trials, trials_that_fit

        if resources.cpus_per_trial <= 2 * TRIAL_CPU or resources.gpus_per_trial < 0:
            raise UserError(f"cpus per trial must be > {2 * TRIAL_CPU:g} and gpus per trial >= 0")
        if address is None and resources.gpus_per_trial > 0 and not torch.cuda.is_available():
            # A local instance has no GPU to give: the trials would wait for one forever.
            raise UserError(f"{space.name} asks for {resources.gpus_per_trial:g} GPU per trial and this machine has "
                            "none; pass --gpus-per-trial 0 to train on the CPU")
        t0 = time.perf_counter()
        with ray_session(address, num_cpus=num_cpus, log_to_driver=verbose >= 2) as started_ray:
            init_seconds = time.perf_counter() - t0 if started_ray else 0.0
            if address is None:
                # Decode the data set once here, before trials start, so parallel workers on this
                # machine read the cache instead of each decoding it (and bad data fails first).
                load_dataset(space.data, data_dir=data_dir, train_subset=pending[0].train_subset,
                             test_subset=pending[0].test_subset)
            if started_ray:
                # A private instance cannot grow: trials beyond what it holds would each take their
                # Tune share of a CPU, and then none could start its worker.
                fits = trials_that_fit(ray.cluster_resources(), resources) or 1
                max_concurrent = min(max_concurrent or resources.max_concurrent_trials or fits, fits)
            setup = TrialSetup.of(space.data, store, resources, data_dir=data_dir, compile=compile)
            result = run_trials(pending, store, setup, name=f"sweep-{space.name}", max_concurrent=max_concurrent,
                                verbose=verbose, mlflow=mlflow)
        result.ray_init_seconds = init_seconds
    else:
        result = SweepResult()
    result.skipped = [s.model_id for s in specs if s not in pending]
    store.add_ensembles(space.ensembles())
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class Completion:
    """What ``complete`` did: models trained, the matrix run (None when no cell was missing) and
    whether Ray was started."""

    models_trained: int = 0
    matrix: MatrixReport | None = None
    started_ray: bool = False
    seconds: float = 0.0


def complete(
    space: SearchSpace,
    store: Store,
    *,
    address: str | None = None,
    data_dir: str | os.PathLike | None = None,
    options: MatrixOptions | None = None,
    verbose: int = 1,
    mlflow: str | None = None,
) -> Completion:
    """Train the space's missing models, record its ensembles and compute its missing matrix
    cells, on a private local Ray instance (``address`` None) or the cluster at ``address``.
    ``verbose`` and ``mlflow`` as for ``train``; the matrix shows a bar of cells unless 0.

    Nothing is started when the store already holds everything.
    """
    start = time.perf_counter()
    done = Completion()
    if not store.missing(space.models()) and not missing_cells(space, store):
        store.add_ensembles(space.ensembles())  # members may have come from other spaces' sweeps
        done.seconds = time.perf_counter() - start
        return done
    from rm_sweep.orchestration.attack_matrix import run_matrix
    from rm_sweep.orchestration.session import ray_session

    with ray_session(address, log_to_driver=verbose >= 2):
        done.started_ray = True
        swept = train(space, store, address=address, data_dir=data_dir, verbose=verbose, mlflow=mlflow)
        done.models_trained = len(swept.trained)
        if not swept.ok:
            raise UserError(f"the sweep did not train {len(swept.failed) + len(swept.unfinished)} model(s) "
                            f"({', '.join([*swept.failed, *swept.unfinished])}); their errors are shown above")
        cells = missing_cells(space, store)
        if cells:
            images, labels = matrix_images(space, data_dir)
            ensembles = {e.ensemble_id: e.member_ids for e in space.ensembles()}
            done.matrix = run_matrix(cells, store, images, labels, ensembles, options or MatrixOptions(),
                                     progress=verbose > 0)
    done.seconds = time.perf_counter() - start
    return done


__all__ = ["Completion", "complete", "matrix_images", "missing_cells", "train"]
