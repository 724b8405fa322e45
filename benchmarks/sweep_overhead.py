"""What Ray Tune + Ray Train cost per model: a sweep of N small models against the same trainings
run back to back in one process, measured in one run.

    python benchmarks/sweep_overhead.py --device cpu --models 4           # this 2-core machine
    python benchmarks/sweep_overhead.py --device cuda --models 8 --width 1 --train-subset 50000

Both sides do the same work per model: load the (cached) data subset, build the model, ``fit``,
write checkpoint and row to a store, on the same cores. The sweep runs as ``rm_sweep.sweep``
does by default, as many trials at once as the instance's CPUs hold (2 trials of 1 CPU on
2 cores); the serial side gives torch as many threads as those trials use together.
``--max-concurrent 1`` runs one trial at a time instead (the serial side then gets one trial's
threads). The per-trial overhead is (sweep - ray.init - serial) / N. The sweep's own timings
split each trial into Train start-up (controller, worker group), setup in the worker,
training, and the rest (per-epoch report and checkpoint upload, store write, trainer shutdown).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rm_sweep.data import load_dataset  # noqa: E402
from rm_sweep.orchestration.session import cpu_count  # noqa: E402
from rm_sweep.orchestration.trials import trials_that_fit  # noqa: E402
from rm_sweep.pipeline import train  # noqa: E402
from rm_sweep.spaces import Resources, parse_space  # noqa: E402
from rm_sweep.store import Store  # noqa: E402
from rm_sweep.train import fit  # noqa: E402

from common import default_data, default_device  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    p.add_argument("--models", type=int, default=4, help="N: models in the sweep")
    p.add_argument("--width", type=float, default=0.125, help="ResNet-18 width factor")
    p.add_argument("--train-subset", type=int, default=500)
    p.add_argument("--test-subset", type=int, default=200)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--data", default=default_data())
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (its torch threads)")
    p.add_argument("--gpus-per-trial", type=float, default=0.25, help="with --device cuda")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs hold)")
    return p.parse_args()


def main() -> None:
    args = _args()
    space = parse_space({
        "name": "overhead", "data": args.data, "train_subset": args.train_subset, "test_subset": args.test_subset,
        "recipe": {"name": "quick", "epochs": args.epochs},
        "models": [{"name": "m", "arch": "resnet18", "width": args.width, "seed": list(range(args.models))}],
    })
    specs = space.models()
    load_dataset(space.data, train_subset=args.train_subset, test_subset=args.test_subset)  # warm the cache for both

    cpus = args.num_cpus or cpu_count()
    resources = Resources(cpus_per_trial=args.cpus_per_trial,
                          gpus_per_trial=args.gpus_per_trial if args.device == "cuda" else 0.0)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    # What the sweep would pick on this local instance, passed to it so the figure says what ran.
    concurrent = args.max_concurrent or trials_that_fit({"CPU": cpus, "GPU": gpus}, resources) or 1
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(cpus, int(concurrent * args.cpus_per_trial))))  # what the trials get together
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "serial")
        t0 = time.perf_counter()
        for spec in specs:
            data = load_dataset(space.data, train_subset=spec.train_subset, test_subset=spec.test_subset)
            model = spec.create(data)
            metrics = fit(model, data, spec.recipe_config(), device=args.device, seed=spec.seed)
            store.add_model(spec, metrics, model.cpu())
        serial = time.perf_counter() - t0
    serial_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        result = train(space, Store(Path(tmp) / "ray"), num_cpus=args.num_cpus, cpus_per_trial=resources.cpus_per_trial,
                       gpus_per_trial=resources.gpus_per_trial, max_concurrent=concurrent, verbose=0)
    if not result.ok or len(result.trained) != len(specs):
        raise SystemExit(f"sweep did not complete: failed {result.failed}, unfinished {result.unfinished}")

    n = len(specs)
    timings = list(result.timings.values())
    mean = {k: sum(getattr(t, k) for t in timings) / len(timings) for k in ("startup", "setup", "train", "other", "total")}
    overhead = (result.seconds - result.ray_init_seconds - serial) / n
    print(f"{n} models: resnet18 width {args.width}, {args.train_subset} images, {args.epochs} epoch(s), "
          f"device {args.device}, {concurrent} trial(s) at a time, serial side {serial_threads} thread(s)")
    print(f"serial, one process       {serial:8.1f} s   ({serial / n:.1f} s per model)")
    print(f"Ray Tune + Ray Train      {result.seconds:8.1f} s   (ray.init {result.ray_init_seconds:.1f} s)")
    print(f"per-trial overhead        {overhead:8.1f} s   (sweep - ray.init - serial) / N")
    print(f"ratio sweep / serial      {result.seconds / serial:8.2f}")
    print("mean trial, as measured inside it:")
    print(f"  Train start-up          {mean['startup']:8.1f} s   Tune function start -> worker loop start")
    print(f"  worker setup            {mean['setup']:8.1f} s   data from cache, model build")
    print(f"  training (fit)          {mean['train']:8.1f} s")
    print(f"  other                   {mean['other']:8.1f} s   reports + checkpoint uploads, store write, shutdown")
    print(f"  total                   {mean['total']:8.1f} s")
    if concurrent == 1:  # with overlapping trials, time between them is not defined
        between = (result.seconds - result.ray_init_seconds) / n - mean["total"]
        print(f"  between trials (Tune)   {between:8.1f} s   scheduling, trial actor start, data warm-up / N")


if __name__ == "__main__":
    main()
