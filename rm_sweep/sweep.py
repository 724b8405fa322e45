"""Train every model a search space names: one Ray Tune trial per model, Ray Train inside.

    python -m rm_sweep.sweep search_spaces/quick.yaml --data folder:../shared/data/cifar10-jpeg
    python -m rm_sweep.sweep search_spaces/fig14.yaml --store s3://bucket/rm --address auto

Models already in the store are skipped; an interrupted sweep continues where it stopped when
run again (each unfinished model from its last finished epoch). The search space is validated
before Ray starts: a bad file costs one line and exit status 2.
"""
from __future__ import annotations

import argparse
import math

import pandas as pd

from rm_sweep.errors import UserError, cli_main
from rm_sweep.spaces import SearchSpace, load_space
from rm_sweep.store import Store, default_store_uri


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rm_sweep.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", help="search space file (search_spaces/*.yaml; schema: docs/search_spaces.md)")
    p.add_argument("--store", default=default_store_uri(),
                   help="store directory or s3:// URI (default: $RM_SWEEP_STORE or ./store)")
    p.add_argument("--address", help="Ray cluster to use (auto, ray://HOST:10001); default: a local Ray instance")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--cpus-per-trial", type=float, help="override the space's resources.cpus_per_trial")
    p.add_argument("--gpus-per-trial", type=float,
                   help="override resources.gpus_per_trial; a fraction (0.25) lets small models share a GPU")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster's resources hold)")
    p.add_argument("--resume", action="store_true",
                   help="restore the previous run of this space (Tuner.restore) before training what is missing")
    p.add_argument("--data", help="override the space's data set: cifar10, mnist or folder:PATH")
    p.add_argument("--data-dir", help="downloads and decoded caches (default $RM_SWEEP_DATA_DIR or ~/.cache/rm_sweep)")
    p.add_argument("--dry-run", action="store_true", help="list the models and whether the store has them; train nothing")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile each model (default: on for trials with a GPU, with CUDA graphs)")
    p.add_argument("--quiet", action="store_true", help="no progress table")
    return p.parse_args(argv)


def _check_flags(args: argparse.Namespace) -> None:
    for name in ("cpus_per_trial", "num_cpus", "max_concurrent"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")


def summary(space: SearchSpace, store: Store, failed: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per model of ``space``: id, description, and what the store says about it."""
    stored = store.models().set_index("model_id")
    rows = []
    for spec in space.models():
        row = stored.loc[spec.model_id] if spec.model_id in stored.index else None
        status = "stored" if row is not None else ("failed" if spec.model_id in (failed or {}) else "missing")
        rows.append({"model_id": spec.model_id, "model": spec.label, "status": status,
                     "clean_accuracy": math.nan if row is None else row.clean_accuracy,
                     "train_seconds": math.nan if row is None else row.train_seconds})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    _check_flags(args)
    space = load_space(args.space, data=args.data)
    store = Store(args.store)
    stored = store.model_ids()
    missing = [s for s in space.models() if s.model_id not in stored]
    if args.dry_run or not missing:
        if not args.dry_run:
            store.add_ensembles(space.ensembles())  # members may have come from other spaces' sweeps
        print(f"{space.name}: {len(space.models()) - len(missing)} of {len(space.models())} models in {store.uri}")
        print(summary(space, store).to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.4g}"))
        return 0
    # Ray is imported only now: a bad space or flag has failed before it, and a finished sweep never needs it.
    from rm_sweep.orchestration.sweep import run_sweep

    result = run_sweep(space, store, address=args.address, num_cpus=args.num_cpus, cpus_per_trial=args.cpus_per_trial,
                       gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, resume=args.resume,
                       data_dir=args.data_dir, compile=args.compile, verbose=0 if args.quiet else 1)
    print(f"\n{space.name}: {len(result.trained)} trained, {len(result.skipped)} already in {store.uri}, "
          f"{len(result.failed)} failed, {len(result.unfinished)} unfinished ({result.seconds:.0f} s)")
    print(summary(space, store, result.failed).to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.4g}"))
    for model_id, error in result.failed.items():
        print(f"failed {model_id}: {error}")
    if result.unfinished:
        print("interrupted: run the same command again (or with --resume) to continue; "
              "each unfinished model resumes from its last finished epoch")
    return 0 if result.ok else 1


if __name__ == "__main__":
    cli_main(main)
