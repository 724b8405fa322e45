"""PGD (madry setting: eps 8/255, 7 steps of 2/255) images/s, side by side on one model:

  rm_sweep   rm_sweep.attacks.pgd on a batch (input gradients only, frozen parameters)
  textbook   (a) the per-step autograd loop most papers write: x.requires_grad_(), model.zero_grad(),
             loss.backward() with the parameters still requiring grad, x.grad.sign(), project, clip
  authors    (b) the authors' Attacks/pgd.py way: one image at a time, a NumPy round trip and
             boolean-mask projection every step (timed on --single-images images)

    python benchmarks/attack_throughput.py --device cpu --width 0.25 --rounds 2 --single-images 16
    python benchmarks/attack_throughput.py --device cuda --width 1.0 --rounds 5 --single-images 64 --amp

Targets on CPU: rm_sweep / textbook >= 1.0, rm_sweep / authors >= 50. The model is a randomly
initialised zoo ResNet-18 in eval mode (throughput does not depend on the weights). Also prints
the largest difference between rm_sweep's and the textbook loop's adversarial images.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from rm_sweep.attacks import get_setting, pgd
from rm_sweep.models import create_model

from common import attack_arguments, median, time_interleaved


def textbook_pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float,
                 steps: int) -> torch.Tensor:
    """(a) PGD as commonly written: every step builds a leaf, backpropagates into the parameters too."""
    x = images.clone()
    for _ in range(steps):
        x.requires_grad_()
        model.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        with torch.no_grad():
            x = x + step * x.grad.sign()
            x = torch.min(torch.max(x, images - eps), images + eps).clamp(0, 1)
    return x.detach()


def authors_pgd(model: nn.Module, image: torch.Tensor, label: torch.Tensor, eps: float, step: float,
                steps: int) -> torch.Tensor:
    """(b) One image (1, C, H, W) the authors' way (their parameters were frozen, as here)."""
    original = image.clone()
    x = image
    for _ in range(steps):
        x = torch.from_numpy(x.cpu().numpy()).to(image.device).requires_grad_(True)
        F.cross_entropy(model(x), label).backward()
        x = x.detach() + step * torch.sign(x.grad)
        over, under = x - original > eps, x - original < -eps
        x[over] = original[over] + eps
        x[under] = original[under] - eps
        x[x > 1] = 1
        x[x < 0] = 0
    return x


def main() -> None:
    ap = attack_arguments(__doc__)
    ap.add_argument("--amp", action="store_true", help="also time rm_sweep's pgd with bf16 autocast")
    ap.add_argument("--channels-last", action="store_true", help="channels_last model and images (all methods)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    method = get_setting("madry_pgd").method  # a PGD: budgets in /255 units
    eps, step, steps = method.eps_255 / 255, method.step_255 / 255, method.steps
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = create_model(args.arch, width=args.width).to(args.device, memory_format=memory_format).eval()
    images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), device=args.device).float() / 255
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (args.batch_size,), device=args.device)
    singles = [(images[i : i + 1], labels[i : i + 1]) for i in range(args.single_images)]

    def authors() -> None:
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        for image, label in singles:
            authors_pgd(model, image, label, eps, step, steps)
        for p in frozen:
            p.requires_grad_(True)

    methods = {
        "rm_sweep": lambda: pgd(model, images, labels, eps, step, steps),
        "textbook": lambda: textbook_pgd(model, images, labels, eps, step, steps),
        "authors": authors,
    }
    if args.amp:
        methods["rm_sweep_bf16"] = lambda: pgd(model, images, labels, eps, step, steps, amp=True)
    times = time_interleaved(methods, args.rounds, args.device)
    per_second = {name: (args.single_images if name == "authors" else args.batch_size) / median(t)
                  for name, t in times.items()}
    difference = (pgd(model, images, labels, eps, step, steps)
                  - textbook_pgd(model, images, labels, eps, step, steps)).abs().max().item()

    for name, rate in per_second.items():
        print(f"{name:>14}: {rate:10.1f} images/s")
    vs_textbook = per_second["rm_sweep"] / per_second["textbook"]
    vs_authors = per_second["rm_sweep"] / per_second["authors"]
    print(f"rm_sweep / textbook: {vs_textbook:.2f}x  (target >= 1.0)")
    print(f"rm_sweep / authors:  {vs_authors:.1f}x  (target >= 50)")
    print(f"max |rm_sweep - textbook| pixel difference: {difference:.2e}")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(json.dumps({"device": device, "arch": args.arch, "width": args.width, "batch_size": args.batch_size,
                      "channels_last": args.channels_last,
                      "rounds": args.rounds, "single_images": args.single_images,
                      "images_per_second": {k: round(v, 2) for k, v in per_second.items()},
                      "rm_sweep_over_textbook": round(vs_textbook, 3), "rm_sweep_over_authors": round(vs_authors, 1)}))


if __name__ == "__main__":
    main()
