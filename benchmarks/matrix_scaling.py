"""Attack matrix cost: S x T cells the naive way (one attack per cell) against the matrix service
(one crafting run per source, one forward pass per set and target), and the actor pool's
evaluation with 1 against 2 actors; one run, side by side.

    python benchmarks/matrix_scaling.py --device cpu --sources 2 --targets 3 --images 500 --width 0.125
    python benchmarks/matrix_scaling.py --device cuda --sources 4 --targets 8 --images 5000 --width 1.0

Models are small ResNet-18s trained for a few epochs on a synthetic, learnable data set (noise
tinted by class), so attacks fool some images and every target sees a real set. Reported:
  naive          S x T x (craft on the source + evaluate the target), one process;
  crafted once   S crafts, then every target evaluated on each set, one process (the algorithm
                 without Ray);
  ray matrix     rm_sweep.orchestration.attack_matrix.run_matrix on a local Ray instance (crafting tasks +
                 target actors; Ray's start-up is reported apart, actor start-up is included);
  pool N actors  evaluating every pre-crafted set against every target with N shard actors of
                 one CPU each (actors loaded beforehand; their loading is reported apart).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from rm_sweep.attacks import get_setting
from rm_sweep.data import Dataset
from rm_sweep.evaluate import craft, defense
from rm_sweep.masks import MaskConfig
from rm_sweep.orchestration.attack_matrix import TargetShard, run_matrix, shard_targets
from rm_sweep.orchestration.session import ray_session
from rm_sweep.orchestration.values import MatrixOptions
from rm_sweep.protocols import Job
from rm_sweep.spec import MatrixCell, ModelSpec, canonical_json
from rm_sweep.store import Store
from rm_sweep.train import fit

from common import default_device

CLASSES = 10


def synthetic(n_train: int, n_test: int, size: int, seed: int = 0) -> Dataset:
    """Noise images with a class-dependent colour tint: learnable in a few epochs, not trivially."""
    gen = torch.Generator().manual_seed(seed)
    tints = torch.randint(0, 60, (CLASSES, 3, 1, 1), generator=gen, dtype=torch.uint8)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % CLASSES
        x = torch.randint(0, 190, (n, 3, size, size), generator=gen, dtype=torch.uint8) + tints[y]
        return x, y

    (train_x, train_y), (test_x, test_y) = split(n_train), split(n_test)
    stats = train_x.float().div(255)
    return Dataset(name="folder:synthetic", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                   classes=tuple(map(str, range(CLASSES))), mean=tuple(stats.mean((0, 2, 3)).tolist()),
                   std=tuple(stats.std((0, 2, 3)).tolist()))


def build_store(root: Path, data: Dataset, sources: int, targets: int, width: float, epochs: int,
                device: str) -> tuple[Store, list[str], list[str]]:
    """Train ``sources`` normal and ``targets`` 0.5-Shallow ResNet-18s into a fresh store."""
    store = Store(root / "store")
    specs = [ModelSpec("resnet18", "folder:synthetic", width=width, seed=s, recipe="quick",
                       recipe_overrides={"epochs": epochs}) for s in range(sources)]
    specs += [ModelSpec("resnet18", "folder:synthetic", width=width, seed=100 + t, recipe="quick",
                        recipe_overrides={"epochs": epochs}, mask=MaskConfig(shallow_ratio=0.5))
              for t in range(targets)]
    for spec in specs:
        torch.manual_seed(spec.seed)
        model = spec.create(data)
        metrics = fit(model, data, spec.recipe_config(), device=device, seed=spec.seed)
        store.add_model(spec, metrics, model.cpu())
    ids = [s.model_id for s in specs]
    return store, ids[:sources], ids[sources:]


def cells(source_ids: list[str], target_ids: list[str], setting_name: str, limit: int) -> list[MatrixCell]:
    setting = get_setting(setting_name)
    return [MatrixCell("black", s, t, "model", setting.name, canonical_json(setting.params()), limit)
            for s in source_ids for t in target_ids]


def naive(store: Store, source_ids: list[str], target_ids: list[str], data: Dataset, setting: str, limit: int,
          device: str) -> float:
    start = time.perf_counter()
    for s in source_ids:
        for t in target_ids:
            adversarial = craft(store.load_model(s).to(device), data.test_x, data.test_y, setting, limit, source_id=s)
            defense(store.load_model(t).to(device), adversarial)
    return time.perf_counter() - start


def crafted_once(store: Store, source_ids: list[str], target_ids: list[str], data: Dataset, setting: str,
                 limit: int, device: str) -> float:
    start = time.perf_counter()
    targets = [store.load_model(t).to(device) for t in target_ids]
    for s in source_ids:
        adversarial = craft(store.load_model(s).to(device), data.test_x, data.test_y, setting, limit, source_id=s)
        for target in targets:
            defense(target, adversarial)
    return time.perf_counter() - start


def pool(store: Store, source_ids: list[str], target_ids: list[str], data: Dataset, setting: str, limit: int,
         actors: int, device: str) -> tuple[float, float]:
    """(load seconds, evaluation seconds) of ``actors`` shard actors over sets crafted beforehand."""
    sets = [ray.put(craft(store.load_model(s).to(device), data.test_x, data.test_y, setting, limit, source_id=s))
            for s in source_ids]
    images, labels = ray.put(data.test_x), ray.put(data.test_y)
    cpus = 1.0  # each actor is one unit of hardware (a core here, a GPU share on a cluster)
    gpus = 1.0 / actors if device.startswith("cuda") else 0.0
    start = time.perf_counter()
    shards = [(TargetShard.options(num_cpus=cpus, num_gpus=gpus).remote(store.location(), group, cpus, 256), list(group))
              for group in shard_targets({t: [t] for t in target_ids}, actors)]
    ray.get([actor.forward_images.remote() for actor, _ in shards])  # returns once each has loaded its targets
    loaded = time.perf_counter()
    jobs = [ray.put(Job(setting, get_setting(setting).params(), limit, ray.get(s))) for s in sets]
    ray.get([actor.count.remote(job, [("black", t) for t in ids], images, labels) for job in jobs for actor, ids in shards])
    done = time.perf_counter()
    for actor, _ in shards:
        ray.kill(actor)
    return loaded - start, done - loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--targets", type=int, default=3)
    parser.add_argument("--images", type=int, default=500, help="test images (the attack limit)")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--width", type=float, default=0.125, help="ResNet-18 width factor")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--setting", default="madry_pgd")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # every contender runs one thread per CPU it holds
    data = synthetic(args.train_images, args.images, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        store, source_ids, target_ids = build_store(Path(tmp), data, args.sources, args.targets, args.width,
                                                    args.epochs, args.device)
        s, t, limit = args.sources, args.targets, args.images
        print(f"{s} sources x {t} targets, {args.setting}, {limit} test images, ResNet-18 width {args.width:g}, "
              f"{args.size}x{args.size}, device {args.device}")
        naive_s = naive(store, source_ids, target_ids, data, args.setting, limit, args.device)
        once_s = crafted_once(store, source_ids, target_ids, data, args.setting, limit, args.device)
        print(f"naive ({s * t} crafts, one process):        {naive_s:8.2f} s")
        print(f"crafted once ({s} crafts, one process):    {once_s:8.2f} s   naive / this = {naive_s / once_s:.2f}x")
        init = time.perf_counter()
        with ray_session(num_cpus=args.num_cpus):
            init = time.perf_counter() - init
            report = run_matrix(cells(source_ids, target_ids, args.setting, limit), store, data.test_x, data.test_y,
                                {}, MatrixOptions(), progress=False)
            print(f"ray matrix ({report.crafts} crafting tasks, {report.actors} actor(s)): {report.seconds:8.2f} s   "
                  f"naive / this = {naive_s / report.seconds:.2f}x   (Ray start-up {init:.1f} s, not included)")
            timings = {n: pool(store, source_ids, target_ids, data, args.setting, limit, n, args.device) for n in (1, 2)}
        for n, (load, evaluate) in timings.items():
            print(f"pool, {n} actor(s): evaluation {evaluate:8.2f} s (loading targets {load:.2f} s)")
        print(f"pool speed-up, 2 actors over 1: {timings[1][1] / timings[2][1]:.2f}x")


if __name__ == "__main__":
    main()
