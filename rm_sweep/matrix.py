"""``python -m rm_sweep.matrix SPACE.yaml``: compute every attack-matrix cell the store lacks.

Models the space names but the store lacks are trained first (the sweep); then adversarial sets
are crafted once per (source, setting) and served to every target by an actor pool
(``rm_sweep.orchestration.matrix``). Cells already in the store are skipped; when nothing is
missing, Ray is not started at all.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rm_sweep.data import load_dataset
from rm_sweep.errors import UserError, cli_main
from rm_sweep.spaces import MatrixCell, SearchSpace, load_space
from rm_sweep.spec import ModelSpec
from rm_sweep.store import Store, default_store_uri

if TYPE_CHECKING:  # importing the Ray layer starts nothing, but takes seconds a complete store need not spend
    from rm_sweep.orchestration.matrix import MatrixOptions, MatrixReport


def missing_models(space: SearchSpace, store: Store) -> list[ModelSpec]:
    """The space's models (ensemble members included) that the store does not hold."""
    stored = store.model_ids()
    return [m for m in space.models() if m.model_id not in stored]


def missing_cells(space: SearchSpace, store: Store) -> list[MatrixCell]:
    """The space's matrix cells that the store does not hold, in file order."""
    stored = store.matrix_keys()
    return [c for c in space.cells if c.key() not in stored]


def matrix_images(space: SearchSpace, data_dir: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images the space's models were evaluated on, in order: uint8 (N, C, H, W) and
    int64 labels (N,). Cells' limits count from the first of them."""
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


@dataclass
class Completion:
    """What ``complete`` did: models trained, ensembles recorded, the matrix run (None when
    no cell was missing) and whether Ray was started."""

    models_trained: int = 0
    ensembles_recorded: int = 0
    matrix: MatrixReport | None = None
    started_ray: bool = False
    seconds: float = 0.0


def complete(
    space: SearchSpace,
    store: Store,
    *,
    address: str | None = None,
    data_dir: str | Path | None = None,
    options: MatrixOptions | None = None,
    progress: bool = True,
) -> Completion:
    """Train the space's missing models, record its ensembles and compute its missing matrix
    cells, on a local Ray instance (``address`` None) or the cluster at ``address``.

    Nothing is started when the store already holds everything.
    """
    start = time.perf_counter()
    done = Completion()
    models, cells = missing_models(space, store), missing_cells(space, store)
    if not models and not cells:
        done.ensembles_recorded = store.add_ensembles(space.ensembles())
        done.seconds = time.perf_counter() - start
        return done
    # Ray is imported only when there is work: a complete store answers in a second.
    from rm_sweep.orchestration.matrix import MatrixOptions, run_matrix
    from rm_sweep.orchestration.session import ray_session
    from rm_sweep.orchestration.sweep import run_sweep

    with ray_session(address):
        done.started_ray = True
        if models:
            swept = run_sweep(space, store, address=address, data_dir=data_dir, verbose=1 if progress else 0)
            done.models_trained = len(swept.trained)
            if not swept.ok:
                raise UserError(f"the sweep did not train {len(swept.failed)} model(s) "
                                f"({', '.join(swept.failed)}); their errors are shown above")
        done.ensembles_recorded = store.add_ensembles(space.ensembles())
        cells = missing_cells(space, store)
        if cells:
            images, labels = matrix_images(space, data_dir)
            ensembles = {e.ensemble_id: e.member_ids for e in space.ensembles()}
            done.matrix = run_matrix(cells, store, images, labels, ensembles, options or MatrixOptions(),
                                     progress=progress)
    done.seconds = time.perf_counter() - start
    return done


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The store, cluster and data flags every command that fills the store takes."""
    parser.add_argument("--store", default=default_store_uri(),
                        help="store directory or s3:// URI (default: $RM_SWEEP_STORE or ./store)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to use (e.g. auto); default: start a local Ray instance with this "
                             "machine's CPUs")
    parser.add_argument("--data", default=None, help="override the space's data set: cifar10, mnist or folder:PATH")
    parser.add_argument("--data-dir", default=None,
                        help="where data sets are downloaded and decoded caches kept "
                             "(default: $RM_SWEEP_DATA_DIR or ~/.cache/rm_sweep)")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rm_sweep.matrix",
        description="Craft and evaluate every attack-matrix cell a search space names and the store lacks "
                    "(training missing models first).")
    parser.add_argument("space", help="search space file (search_spaces/*.yaml)")
    add_common_arguments(parser)
    parser.add_argument("--actors", type=int, default=None,
                        help="target-shard actors (default: as many as fit beside one crafting task)")
    parser.add_argument("--gpus-per-craft", type=float, default=None,
                        help="GPU share per crafting task (default 0.5 when the cluster has GPUs)")
    parser.add_argument("--gpus-per-actor", type=float, default=None,
                        help="GPU share per target actor (default 0.25 when the cluster has GPUs)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per attack batch and forward pass")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    space = load_space(args.space, data=args.data)
    store = Store(args.store)
    from rm_sweep.orchestration.matrix import MatrixOptions  # after validation: importing Ray takes a while

    options = MatrixOptions(actors=args.actors, gpus_per_craft=args.gpus_per_craft,
                            gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size)
    done = complete(space, store, address=args.address, data_dir=args.data_dir, options=options)
    if done.matrix is None:
        trained = f"trained {done.models_trained} model(s); " if done.models_trained else ""
        print(f"{space.name}: {trained}all {len(space.cells)} matrix cells are in {store.uri}")
    else:
        m = done.matrix
        print(f"{space.name}: {m.cells} cell(s) added to {store.uri} in {m.seconds:.0f} s "
              f"({m.crafts} crafting run(s) over {m.crafted_images} images, {m.actors} target actor(s), "
              f"{m.forward_images} images through targets); trained {done.models_trained} model(s)")
    return 0


if __name__ == "__main__":
    cli_main(main)
