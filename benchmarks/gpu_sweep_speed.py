"""The sweep's speed on one GPU: aggregate training images/s with 1, 2 and 4 Ray Tune trials
sharing the card (fractional GPUs), against one model trained alone by ``fit`` in this process,
measured in one run; each trial's start-up and compile time; whether compiled code is reused.

    python benchmarks/gpu_sweep_speed.py --data folder:data/cifar10-jpeg      # on a GPU machine
    python benchmarks/gpu_sweep_speed.py --device cpu --width 0.125 --train-subset 256 \\
        --test-subset 64 --epochs 2 --trials 1 2                               # the CPU smoke run

Every model is a ResNet-18 (0.7-Shallow, the masked case) with the paper's optimiser, trained
for ``--epochs`` (at least 2): the first epoch holds compiling (CUDA graphs, ``fit``'s default
on CUDA), the later ones are the steady state. Reported per configuration:

- steady img/s: each trial's median training images/s over its epochs after the first, summed
  over the trials (they start together and run side by side, so their steady epochs overlap);
- wall img/s: all images trained / the sweep's wall time after ``ray.init`` (start-ups, compiles,
  tests and checkpoints included);
- start-up: Tune function start -> worker loop (the Train controller and worker group);
- compile: the first epoch's training time minus a steady epoch's.

All compiles share one Inductor cache folder, fresh at the start of the run: the first trial
compiles cold, later ones (other processes) may find its kernels. ``--json PATH`` also writes
the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rm_sweep.data import load_dataset  # noqa: E402
from rm_sweep.pipeline import train  # noqa: E402
from rm_sweep.spaces import SearchSpace, parse_space  # noqa: E402
from rm_sweep.store import Store  # noqa: E402
from rm_sweep.train import fit  # noqa: E402

from common import default_data, default_device  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    p.add_argument("--data", default=default_data())
    p.add_argument("--data-dir", default=None, help="decoded-data cache (default: rm_sweep's)")
    p.add_argument("--width", type=float, default=1.0, help="ResNet-18 width factor")
    p.add_argument("--train-subset", type=int, default=None, help="training images (default: all)")
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3, help="per model, at least 2 (the first compiles)")
    p.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4], help="trials sharing the GPU, per run")
    p.add_argument("--cpus-per-trial", type=float, default=2.0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch compiles")
    return args


def _space(args: argparse.Namespace, name: str, models: int, first_seed: int) -> SearchSpace:
    subsets = {k: v for k, v in (("train_subset", args.train_subset), ("test_subset", args.test_subset)) if v}
    return parse_space({
        "name": name, "data": args.data, **subsets,
        "recipe": {"name": "paper", "epochs": args.epochs},
        "models": [{"name": "m", "arch": "resnet18", "width": args.width, "shallow_ratio": 0.7,
                    "seed": list(range(first_seed, first_seed + models))}],
    })


def _steady(epochs: list[dict[str, float]], images: int) -> tuple[float, float]:
    """(steady images/s, compile seconds) of one model's per-epoch metrics, ``images`` trained per
    epoch: a steady epoch's rate, and how much longer the first epoch's training took."""
    rate = statistics.median(e["images_per_second"] for e in epochs[1:])
    return rate, images / epochs[0]["images_per_second"] - images / rate


def _images_per_epoch(train_images: int, batch_size: int) -> int:
    return train_images // batch_size * batch_size  # fit drops the last partial batch


def _alone(args: argparse.Namespace) -> dict[str, float]:
    """One model trained by ``fit`` in this process, as a trial would train it."""
    space = _space(args, "alone", 1, first_seed=100)
    (spec,) = space.models()
    data = load_dataset(space.data, data_dir=args.data_dir, train_subset=spec.train_subset,
                        test_subset=spec.test_subset)
    epochs: list[dict[str, float]] = []
    recipe = spec.recipe_config()
    images = _images_per_epoch(len(data.train_x), recipe.batch_size)
    t0 = time.perf_counter()
    fit(spec.create(data), data, recipe, seed=spec.seed, device=args.device,
        report=lambda metrics, _: epochs.append(metrics))
    rate, compile_seconds = _steady(epochs, images)
    return {"steady": rate, "wall": images * args.epochs / (time.perf_counter() - t0), "compile": compile_seconds}


def _sweep(args: argparse.Namespace, trials: int, first_seed: int) -> dict[str, object]:
    space = _space(args, f"speed{trials}", trials, first_seed)
    specs = space.models()
    gpus = 1 / trials if args.device == "cuda" else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        result = train(space, Store(Path(tmp) / "store"), data_dir=args.data_dir, cpus_per_trial=args.cpus_per_trial,
                       gpus_per_trial=gpus, max_concurrent=trials, verbose=0)
    if not result.ok or len(result.trained) != trials:
        raise SystemExit(f"the {trials}-trial sweep did not finish: failed {result.failed}, "
                         f"unfinished {result.unfinished}")
    data = load_dataset(space.data, data_dir=args.data_dir, train_subset=specs[0].train_subset,
                        test_subset=specs[0].test_subset)
    images = _images_per_epoch(len(data.train_x), specs[0].recipe_config().batch_size)
    steady = [_steady(result.epoch_metrics[s.model_id], images) for s in specs]
    return {
        "trials": trials, "gpu_share": gpus,
        "steady": sum(rate for rate, _ in steady),
        "wall": images * args.epochs * trials / (result.seconds - result.ray_init_seconds),
        "startup": [result.timings[s.model_id].startup for s in specs],
        "compile": [seconds for _, seconds in steady],
    }


def main() -> None:
    args = _args()
    # One fresh Inductor cache for the whole run, seen by every trial's process too.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rm_sweep-inductor-")
    data = load_dataset(args.data, data_dir=args.data_dir, train_subset=args.train_subset,
                        test_subset=args.test_subset)  # decode once, before anything is timed
    print(f"ResNet-18 width {args.width} 0.7-Shallow, {len(data.train_x)} training images, {args.epochs} epochs, "
          f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    runs, seed = [], 0
    for trials in args.trials:  # the first sweep compiles with a cold cache
        runs.append(_sweep(args, trials, seed))
        seed += trials
    alone = _alone(args)

    print("\n| trials on the GPU | GPU share each | steady img/s | vs fit alone | wall img/s | start-up s | compile s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fit alone, in process | 1 | {alone['steady']:,.0f} | 1.00 | {alone['wall']:,.0f} | - | "
          f"{alone['compile']:.1f} |")
    for run in runs:
        startup, compile_seconds = run["startup"], run["compile"]
        print(f"| {run['trials']} | {run['gpu_share']:g} | {run['steady']:,.0f} | {run['steady'] / alone['steady']:.2f} | "
              f"{run['wall']:,.0f} | {statistics.mean(startup):.1f} | "
              f"{', '.join(f'{c:.1f}' for c in compile_seconds)} |")
    print("\ncompile s lists each trial's; the first sweep's trial compiled with a cold Inductor cache, "
          "later trials and fit alone with the kernels cached so far")
    if args.json:
        Path(args.json).write_text(json.dumps({"alone": alone, "sweeps": runs, "epochs": args.epochs,
                                               "width": args.width, "train_images": len(data.train_x)}, indent=1))


if __name__ == "__main__":
    main()
