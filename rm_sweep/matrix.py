"""``python -m rm_sweep.matrix SPACE.yaml``: compute every attack-matrix cell the store lacks.

Models the space names but the store lacks are trained first (the sweep); then adversarial sets
are crafted once per (source, setting, limit) and served to every target by an actor pool
(``rm_sweep.orchestration.attack_matrix``). Cells already in the store are skipped; when nothing
is missing, Ray is not started at all.
"""
from __future__ import annotations

import argparse

from rm_sweep import cli, pipeline
from rm_sweep.errors import cli_main
from rm_sweep.orchestration.values import MatrixOptions


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m rm_sweep.matrix", "Craft and evaluate every attack-matrix cell a search space names "
                                                "and the store lacks (training missing models first).")
    p.add_argument("space", help="search space: a YAML file or a packaged name (table2, fig14, ...)")
    cli.add_pipeline(p)
    p.add_argument("--actors", type=cli.count(), default=None,
                   help="target-shard actors (default: as many as fit beside one crafting task)")
    p.add_argument("--gpus-per-craft", type=cli.positive(strict=False), default=None,
                   help="GPU share per crafting task (default 0.5 when the cluster has GPUs)")
    p.add_argument("--gpus-per-actor", type=cli.positive(strict=False), default=None,
                   help="GPU share per target actor (default 0.25 when the cluster has GPUs)")
    p.add_argument("--batch-size", type=cli.count(), default=256,
                   help="images per attack batch and forward pass")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    space, store = cli.space_and_store(args)
    options = MatrixOptions(actors=args.actors, gpus_per_craft=args.gpus_per_craft,
                            gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size)
    done = pipeline.complete(space, store, address=args.address, data_dir=args.data_dir, options=options,
                             verbose=cli.verbosity(args), mlflow=args.mlflow)
    cli.print_damaged(done.damaged, trained=True)
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
