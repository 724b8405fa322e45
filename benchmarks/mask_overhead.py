"""Training-step time of a masked ResNet-18 (0.7-Shallow) over the unmasked one, side by side.

    python benchmarks/mask_overhead.py --device cpu --width 0.25 --rounds 10
    python benchmarks/mask_overhead.py --device cuda --width 1.0 --batch-size 128 --rounds 50
    python benchmarks/mask_overhead.py --device cuda --width 1.0 --rounds 30 --steps-per-round 5 --compile

Target: ratio <= 1.05. Prints one line per model and the ratio of medians. ``--compile``
compiles both models as ``fit(compile=True)`` does (CUDA graphs on a GPU).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from rm_sweep.masks import MaskConfig
from rm_sweep.models import create_model
from rm_sweep.train import compile_for_training

from common import default_device, median, time_interleaved


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps-per-round", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.7, help="shallow drop ratio of the masked model")
    ap.add_argument("--compile", action="store_true", help="compile both models as fit(compile=True) does")
    args = ap.parse_args()

    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    x = torch.rand(args.batch_size, 3, 32, 32, device=args.device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=args.device)
    steps = {}
    for name, mask in [("unmasked", None), (f"{args.ratio}-shallow", MaskConfig(shallow_ratio=args.ratio))]:
        model = create_model("resnet18", width=args.width, mask=mask).to(args.device, memory_format=torch.channels_last)
        net = compile_for_training(model, torch.device(args.device)) if args.compile else model
        one = make_step(net.train(), x, y, amp=cuda)
        steps[name] = lambda one=one: [one() for _ in range(args.steps_per_round)]
    times = time_interleaved(steps, args.rounds, args.device, warmup=2)
    med = {k: median(v) / args.steps_per_round for k, v in times.items()}
    names = list(med)
    for k in names:
        print(f"{k:>14}: {med[k] * 1e3:9.2f} ms/step  {args.batch_size / med[k]:9.1f} img/s")
    ratio = med[names[1]] / med[names[0]]
    print(f"masked / unmasked step time: {ratio:.3f}  (target <= 1.05)")
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "width": args.width,
                      "batch_size": args.batch_size, "compile": args.compile, "rounds": args.rounds,
                      "ratio": round(ratio, 4)}))


if __name__ == "__main__":
    main()
