"""Square attack (L-inf) images/s, batched against one image at a time, side by side:

  batched   rm_sweep.attacks.square_linf on --batch-size images (one forward pass per
            iteration for all images still unbroken)
  single    the same function called on one image at a time (timed on --single-images images)

    python benchmarks/square_throughput.py --device cpu --width 0.25 --queries 100 --rounds 2 --single-images 16
    python benchmarks/square_throughput.py --device cuda --width 1.0 --queries 1000 --rounds 3 --single-images 32

Target on CPU: batched / single >= 2 (images/s). Each image draws from its own generator keyed by
its index, so image i does the same work (the same queries, the same result) in both; the
script checks that on the timed images. An image stops at success, so images/s depends on how
many queries the images need: both columns also give queries/s and mean queries per image.
The model is a randomly initialised zoo ResNet-18 in eval mode; labels are its own predictions,
so every image starts correctly classified.
"""
from __future__ import annotations

import json

import torch

from rm_sweep.attacks import square_linf
from rm_sweep.models import create_model

from common import attack_arguments, median, time_interleaved


def main() -> None:
    ap = attack_arguments(__doc__)
    ap.add_argument("--queries", type=int, default=100, help="max_queries per image")
    ap.add_argument("--eps", type=float, default=8.0, help="L-inf radius in /255 units")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = create_model(args.arch, width=args.width).to(args.device).eval()
    images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), device=args.device).float() / 255
    with torch.no_grad():
        labels = model(images).argmax(1)
    eps = args.eps / 255
    singles = [(images[i : i + 1], labels[i : i + 1], torch.tensor([i])) for i in range(args.single_images)]
    results: dict[str, list] = {"batched": [], "single": []}

    def batched() -> None:
        results["batched"] = [square_linf(model, images, labels, eps, args.queries)]

    def single() -> None:
        results["single"] = [square_linf(model, x, y, eps, args.queries, ids=i) for x, y, i in singles]

    times = time_interleaved({"batched": batched, "single": single}, args.rounds, args.device)
    whole = results["batched"][0]
    alone_queries = torch.cat([r.queries for r in results["single"]]).cpu()
    same = all(torch.equal(r.adversarial[0], whole.adversarial[i]) and r.queries.item() == whole.queries[i].item()
               for i, r in enumerate(results["single"]))
    counts = {"batched": (args.batch_size, whole.queries.sum().item()),
              "single": (args.single_images, alone_queries.sum().item())}
    rates = {name: {"images_per_second": n_images / median(times[name]),
                    "queries_per_second": queries / median(times[name]), "mean_queries": queries / n_images}
             for name, (n_images, queries) in counts.items()}

    for name, rate in rates.items():
        print(f"{name:>8}: {rate['images_per_second']:9.1f} images/s {rate['queries_per_second']:10.1f} queries/s"
              f"  ({rate['mean_queries']:.1f} queries/image)")
    ratio = rates["batched"]["images_per_second"] / rates["single"]["images_per_second"]
    query_ratio = rates["batched"]["queries_per_second"] / rates["single"]["queries_per_second"]
    print(f"batched / single: {ratio:.1f}x images/s, {query_ratio:.1f}x queries/s  (target >= 2 on CPU)")
    print(f"success rate (batched): {whole.success.float().mean().item():.2f}; "
          f"timed single images equal to their batched results: {same}")
    threads = f"cpu, {torch.get_num_threads()} threads"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else threads
    print(json.dumps({"device": device, "arch": args.arch, "width": args.width, "batch_size": args.batch_size,
                      "queries": args.queries, "eps_255": args.eps, "rounds": args.rounds,
                      "single_images": args.single_images,
                      "rates": {k: {m: round(v, 2) for m, v in r.items()} for k, r in rates.items()},
                      "batched_over_single": round(ratio, 2), "batched_over_single_queries": round(query_ratio, 2),
                      "same_results": same}))


if __name__ == "__main__":
    main()
