"""What each way of keying a folder's decoded cache costs per load, side by side.

    python data_cache_key.py --folder ../../shared/data/cifar10-jpeg --rounds 3

Contenders: the old key (modification times of the split and class directories: blind to an
image replaced in place), ``rm_sweep.folders.fingerprint`` (one ``stat`` per file: size,
modification and status-change time), and hashing every image's content. Decoding the folder
(what a cache miss costs) is timed once for scale. Wall and CPU seconds: on a shared machine the
wall time follows the load, the CPU time much less.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rm_sweep import folders


def directory_key(root: Path) -> list:
    dirs = [root / s for s in folders.SPLITS]
    dirs += sorted(c for d in list(dirs) for c in d.iterdir() if c.is_dir())
    return [[str(d.relative_to(root)), d.stat().st_mtime_ns] for d in dirs]


def content_key(root: Path) -> str:
    digest = hashlib.sha256()
    for split in folders.SPLITS:
        for directory, subdirs, files in sorted(os.walk(root / split)):
            subdirs.sort()
            for name in sorted(files):
                with open(os.path.join(directory, name), "rb") as f:
                    digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def timed(fn, *args) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode", action="store_true", help="also time decoding the whole folder once")
    args = p.parse_args()
    root = folders.check_folder(args.folder)
    contenders = {"directory mtimes (old)": directory_key, "fingerprint (stat per file)": folders.fingerprint,
                  "content hash": content_key}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            times[name].append(timed(fn, root))
    load = os.getloadavg()[0]
    print(f"{root} (load average {load:.1f}), best of {args.rounds}, wall / CPU seconds per load:")
    for name, runs in times.items():
        wall, cpu = min(runs)
        print(f"  {name:28s} {wall:7.2f} / {cpu:5.2f}")
    if args.decode:
        wall, cpu = timed(folders.decode, root)
        print(f"  {'decoding (a cache miss)':28s} {wall:7.2f} / {cpu:5.2f}")


if __name__ == "__main__":
    main()
