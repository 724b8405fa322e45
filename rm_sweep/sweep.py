"""Train every model a search space names: one Ray Tune trial per model, Ray Train inside.

    python -m rm_sweep.sweep quick --data folder:../shared/data/cifar10-jpeg     # a packaged space
    python -m rm_sweep.sweep my_space.yaml --store s3://bucket/rm --address auto

Models already in the store are skipped, and so are models another live run is training (its
lease in the store): two sweeps on one store share the work. An interrupted sweep continues
where it stopped when run again (each unfinished model from its last finished epoch). The search
space, the store (writable?) and, for a local run, the data are checked before Ray starts: bad input costs one
line and exit status 2.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rm_sweep import cli, pipeline
from rm_sweep.errors import cli_main
from rm_sweep.leases import Leases, Owner
from rm_sweep.orchestration.values import SweepResult
from rm_sweep.spaces import SearchSpace
from rm_sweep.store import Store

if TYPE_CHECKING:
    import pandas as pd


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m rm_sweep.sweep", __doc__.split("\n\n")[0])
    p.add_argument("space", help="search space: a YAML file (schema: docs/search_spaces.md) or a packaged name "
                                 "(quick, fig14, table2, ...)")
    cli.add_pipeline(p)
    p.add_argument("--num-cpus", type=cli.count(), help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--cpus-per-trial", type=cli.positive(),
                   help="override the space's resources.cpus_per_trial")
    p.add_argument("--gpus-per-trial", type=cli.positive(strict=False),
                   help="override resources.gpus_per_trial; a fraction (0.25) lets small models share a GPU")
    p.add_argument("--max-concurrent", type=cli.count(),
                   help="trials at once (default: the space's resources.max_concurrent_trials, else what the "
                        "cluster holds; a local instance never runs more than it holds)")
    p.add_argument("--dry-run", action="store_true", help="list the models and whether the store has them; train nothing")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile each model (default: on for trials with a GPU, with CUDA graphs)")
    return p.parse_args(argv)


def print_models(models: pd.DataFrame, store: Store) -> None:
    """Print ``pipeline.model_status``'s table (a dry run: nothing trained), then why each damaged
    model is unusable and which missing ones another run is training now."""
    cli.print_table(models)
    damaged = models.loc[models["status"] == "damaged", "model_id"].tolist()
    if damaged:  # the table says which; their reasons are looked up for them alone
        cli.print_damaged(store.unusable(damaged), trained=False)
    leases = Leases(store.files, Owner.new())
    for model_id in models.loc[models["status"] != "stored", "model_id"]:
        lease = leases.held_elsewhere(model_id)
        if lease is not None:
            print(f"model {model_id}: {lease.describe()}")


def _dry_run(space: SearchSpace, store: Store) -> None:
    models = pipeline.model_status(space, store)
    print(f"{space.name}: {(models['status'] == 'stored').sum()} of {len(models)} models in {store.uri}")
    print_models(models, store)


def _report(space: SearchSpace, store: Store, result: SweepResult) -> None:
    if not result.trained and not result.failed and not result.unfinished and not result.leased:
        print(f"{space.name}: {len(result.skipped)} of {len(space.models())} models in {store.uri}")
    else:
        print(f"\n{space.name}: {len(result.trained)} trained, {len(result.skipped)} already in {store.uri}, "
              f"{len(result.failed)} failed, {len(result.leased)} leased by another run, "
              f"{len(result.unfinished)} unfinished ({result.seconds:.0f} s)")
    cli.print_table(pipeline.model_status(space, store, result))
    cli.print_damaged(result.damaged, trained=True)
    if result.removed_states:
        print(f"deleted the leftover training state of {len(result.removed_states)} stored model(s) "
              f"({', '.join(result.removed_states)})")
    for model_id, reason in result.restarted.items():
        print(f"model {model_id}: {reason}; trained from the start")
    for model_id, lease in result.leased.items():
        print(f"model {model_id}: {lease}")
    for model_id, error in result.failed.items():
        print(f"failed {model_id}: {error}")
    if result.leased:
        print("another run is training the leased models: run the same command again once it is done "
              "(a lease left by a run that was killed expires; docs/security.md)")
    if result.unfinished:
        print("interrupted: run the same command again to continue; each unfinished model resumes from its last "
              "finished epoch")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    space, store = cli.space_and_store(args)
    if args.dry_run:
        _dry_run(space, store)
        return 0
    result = pipeline.train(space, store, address=args.address, num_cpus=args.num_cpus,
                            cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                            max_concurrent=args.max_concurrent, data_dir=args.data_dir, compile=args.compile,
                            verbose=cli.verbosity(args), mlflow=args.mlflow)
    _report(space, store, result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    cli_main(main)
