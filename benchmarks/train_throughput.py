"""Training images/s of ResNet-18: this project's loader and loop against the usual CIFAR reference loop.

    python benchmarks/train_throughput.py --device cpu --steps 2 --rounds 3
    python benchmarks/train_throughput.py --device cuda --steps 30 --rounds 3
    python benchmarks/train_throughput.py --device cuda --epoch

Ours: ``rm_sweep.data.DeviceLoader`` (uint8 images on the device, crop+flip on whole batches) and
``rm_sweep.train.train_epoch`` as ``fit`` runs it (channels-last; bf16 autocast on CUDA).
Reference: a torchvision ``DataLoader`` over in-memory images with ``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip``, ``ToTensor`` (as torchvision's CIFAR10 serves them: a PIL image per
item), worker processes, float32, the same model and optimiser. Both run on the same random
uint8 images (throughput does not depend on pixel values), taking turns round by round.
Targets: ratio >= 1.0 on CPU, >= 2.0 on a GPU. ``--compile`` (the default on CUDA, as it is
``fit``'s) adds our loop with the model compiled as ``fit`` compiles it (CUDA graphs on a GPU)
as a third contender; ``--no-compile`` leaves it out.

``--epoch`` instead times one full epoch (``--epoch-images``, default CIFAR-10's 50,000) of
full-width 0.7-Shallow ResNet-18 with our loop (compiled or not as above) after a warm-up
epoch. Target: <= 5 s on an H100.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from collections.abc import Iterator

import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from rm_sweep.data import DeviceLoader
from rm_sweep.masks import MaskConfig
from rm_sweep.models import create_model
from rm_sweep.train import compile_for_training, compiles_by_default, train_epoch

from common import default_device, median, sync, time_interleaved


class InMemoryImages(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: a PIL image from an (H, W, C) uint8 array, transformed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: T.Compose) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def optimiser(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, compiled: bool = False):
    """``steps`` training steps per call, exactly as ``fit`` trains (``fit(compile=True)`` if ``compiled``)."""
    device = torch.device(args.device)
    model.to(device, memory_format=torch.channels_last)
    net = compile_for_training(model, device) if compiled else model
    opt = optimiser(model)
    loader = DeviceLoader(x, y, args.batch_size, device=device, augment="crop-flip", shuffle=True,
                          drop_last=True, channels_last=True)
    return lambda: train_epoch(net, loader, opt, amp=device.type == "cuda")


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace):
    """``steps`` training steps per call of the plain DataLoader loop (float32, default memory format)."""
    model.to(args.device)
    opt = optimiser(model)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    loader = DataLoader(InMemoryImages(x, y, transform), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
                        persistent_workers=args.workers > 0)
    batches: Iterator = itertools.chain.from_iterable(itertools.repeat(loader))

    def run() -> None:
        model.train()
        for images, labels in itertools.islice(batches, args.steps):
            images = images.to(args.device, non_blocking=True)
            labels = labels.to(args.device, non_blocking=True)
            loss = nn.functional.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()

    return run


def side_by_side(args: argparse.Namespace) -> None:
    n = args.steps * args.batch_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    rows = []
    for width in args.widths:
        for mask in (None, MaskConfig(shallow_ratio=0.7)):
            label = f"resnet18 width {width:g} {'0.7-shallow' if mask else 'unmasked'}"
            contenders = {"ours": ours, "reference": reference}
            if args.compile:
                contenders["ours_compiled"] = functools.partial(ours, compiled=True)
            fns = {}
            for name, make in contenders.items():
                torch.manual_seed(0)
                fns[name] = make(create_model("resnet18", width=width, mask=mask), x, y, args)
            times = time_interleaved(fns, args.rounds, args.device, warmup=1)
            speed = {k: n / median(v) for k, v in times.items()}
            row = {"model": label, **{k: round(v, 1) for k, v in speed.items()},
                   "ratio": round(speed["ours"] / speed["reference"], 3)}
            line = (f"{label:>34}: ours {speed['ours']:9.1f} img/s   reference {speed['reference']:9.1f} img/s"
                    f"   ratio {row['ratio']:5.2f}")
            if args.compile:
                row["ratio_compiled"] = round(speed["ours_compiled"] / speed["reference"], 3)
                line += f"   compiled {speed['ours_compiled']:9.1f} img/s   ratio {row['ratio_compiled']:5.2f}"
            print(line, flush=True)
            rows.append(row)
    cuda = args.device.startswith("cuda")
    default = "ratio_compiled" if compiles_by_default(torch.device(args.device)) else "ratio"
    for key in ("ratio", "ratio_compiled") if args.compile else ("ratio",):
        note = "  (fit's default on this device)" if key == default else ""
        print(f"target: {key} >= {2.0 if cuda else 1.0}; lowest {min(r[key] for r in rows):.2f}{note}")
    print(json.dumps({"device": device_name(args.device), "batch_size": args.batch_size, "steps": args.steps,
                      "rounds": args.rounds, "workers": args.workers, "compile": args.compile, "results": rows}))


def full_epoch(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.epoch_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (args.epoch_images,), generator=gen)
    torch.manual_seed(0)
    model = create_model("resnet18", width=1.0, mask=MaskConfig(shallow_ratio=0.7))
    args.steps = args.epoch_images // args.batch_size
    epoch = ours(model, x, y, args, compiled=args.compile)
    epoch()  # warm-up: compilation, cuDNN algorithm search
    seconds = []
    for _ in range(args.rounds):
        sync(args.device)
        start = time.perf_counter()
        epoch()
        sync(args.device)
        seconds.append(time.perf_counter() - start)
    best, med = min(seconds), median(seconds)
    print(f"resnet18 width 1 0.7-shallow, {args.epoch_images} images/epoch, batch {args.batch_size}: "
          f"median {med:.2f} s/epoch (best {best:.2f}), {args.epoch_images / med:.0f} img/s; target <= 5 s on an H100")
    print(json.dumps({"device": device_name(args.device), "epoch_images": args.epoch_images,
                      "batch_size": args.batch_size, "compile": args.compile, "rounds": args.rounds,
                      "median_epoch_seconds": round(med, 3), "best_epoch_seconds": round(best, 3)}))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--workers", type=int, default=2,
                    help="reference DataLoader workers (default 2, as in kuangliu/pytorch-cifar's loop)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction,
                    help="also time our loop with the model compiled as fit compiles it (with --epoch: only that); "
                         "default: on for CUDA, as in fit")
    ap.add_argument("--epoch", action="store_true", help="time full epochs instead of the side-by-side comparison")
    ap.add_argument("--epoch-images", type=int, default=50000)
    args = ap.parse_args()
    if args.compile is None:
        args.compile = compiles_by_default(torch.device(args.device))
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as fit does: fixed shapes, so tuned kernels pay off
    full_epoch(args) if args.epoch else side_by_side(args)


if __name__ == "__main__":
    main()
