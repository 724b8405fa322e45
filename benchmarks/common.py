"""Shared timing helpers for the benchmarks: side-by-side, interleaved, median of rounds."""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

LOCAL_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_data() -> str:
    """The shared CIFAR-10 JPEG folder beside the checkout when there is one, else torchvision's CIFAR-10."""
    return f"folder:{LOCAL_DATA}" if LOCAL_DATA.is_dir() else "cifar10"


def attack_arguments(description: str | None) -> argparse.ArgumentParser:
    """The flags the attack benchmarks share: device, model, batch, rounds, single images, threads."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--width", type=float, default=1.0, help="channel width factor (0.25 for quick CPU runs)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per method (median reported)")
    ap.add_argument("--single-images", type=int, default=16, help="images timed one at a time")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return ap


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], None]], rounds: int, device: str, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns round by round.

    Taking turns matters on shared machines: load from elsewhere then hits every contender
    alike, so ratios stay meaningful even when absolute times drift.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)
