"""Models and images for the attack tests: a tiny CNN with the zoo's contract, random 8-bit
batches, and real CIFAR-10 JPEGs to train it on (the fixtures ``cifar``, ``trained``, ``correct``)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor


class TinyCNN(nn.Module):
    """A small CIFAR-shaped classifier with the zoo's contract: input in [0, 1], normalises itself."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1))
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(8 * width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


def load_cifar(folder: Path, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` JPEGs of every class folder: uint8 (N, 3, 32, 32), int64 (N,)."""
    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(class_dir.iterdir())[:per_class]:
            images.append(pil_to_tensor(Image.open(path).convert("RGB")))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def train_tiny_cnn(cifar: dict[str, torch.Tensor]) -> TinyCNN:
    """A TinyCNN trained for a few seconds on 2000 CIFAR-10 images (~37 % test accuracy)."""
    torch.manual_seed(0)
    model = TinyCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = cifar["train_x"].float() / 255, cifar["train_y"]
    for _ in range(6):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    accuracy = (model(cifar["test_x"]).argmax(1) == cifar["test_y"]).float().mean().item()
    assert accuracy > 0.25, f"the test model did not learn (accuracy {accuracy:.2f})"
    return model


def random_batch(n: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32,
                 size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 8-bit images (on the k/255 grid, as real data) and labels."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen).to(dtype) / 255
    return images, torch.randint(0, 10, (n,), generator=gen)


def untrained_cnn(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(width=8).to(dtype).eval()
