"""Write small ImageFolder data sets (PNG, so pixels survive exactly) for tests."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def write_image_folder(
    root: Path, *, classes: int = 3, train: int = 12, test: int = 6, size: int = 8, channels: int = 3,
    splits: tuple[str, ...] = ("train", "test"), seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random images, ``train``/``test`` per class, under ``root/<split>/c<k>/<i>.png``.

    Returns the images as uint8 (N, C, H, W) and labels as int64 (N,) per split, in
    ImageFolder order (class folder, then file name).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for split, per_class in (("train", train), ("test", test)):
        if split not in splits:
            continue
        x = torch.randint(0, 256, (classes * per_class, channels, size, size), dtype=torch.uint8, generator=gen)
        y = torch.arange(classes).repeat_interleave(per_class)
        for i, (img, label) in enumerate(zip(x, y)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = img.permute(1, 2, 0).squeeze(-1).numpy()  # (H, W, C), or (H, W) for grayscale
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    return out
