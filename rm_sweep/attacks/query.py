"""What the query attacks share: their result, exact query counting, and per-image randomness.

Query attacks see only a model's outputs (Square: its scores; HopSkipJump: its top-1 label) and
return a ``QueryResult``. Queries are what they spend, so they are counted exactly: every image
passed through the model's forward is one query of the input image it was made from, the first
(the clean image) included, no image ever uses more than ``max_queries``, and an image stops at
its first success (so its count is its queries to success). ``CountingModel`` counts on its own,
for tests and protocols to check the attacks' counts against.

The images of a batch step together: one forward pass per step for all images still at work.
Yet each image draws its randomness from its own generator, keyed by ``(seed, id)``, so its
result does not depend on which other images share its batch; pass test-set indices as ``ids``
to make results independent of how a data set is cut into batches.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from rm_sweep import checks
from rm_sweep.attacks.base import check_batch, round_to_8bit
from rm_sweep.errors import UserError

# Distances within this much of eps count as within eps: |(x + eps) - x| can exceed eps by a
# float rounding (~1e-7), which must not undo a success; one 8-bit level is 3.9e-3.
DIST_SLACK = 1e-6


@dataclass(frozen=True)
class QueryResult:
    """What a query attack returns.

    Attributes:
        adversarial: (N, C, H, W) in [0, 1]. Where ``success``, an image the model misclassifies
            within eps (L-inf) of the input; elsewhere Square's best iterate (within eps, not
            misclassified) or, for HopSkipJump, the input image itself.
        queries: (N,) int64, images forwarded through the model for each input image, the clean
            one included; never more than ``max_queries``.
        success: (N,) bool, the model misclassifies ``adversarial`` (already true with one query
            for an image the model misclassifies clean).
    """

    adversarial: torch.Tensor
    queries: torch.Tensor
    success: torch.Tensor


class CountingModel(nn.Module):
    """Wraps a model and counts the images passed through its forward (``count``) and the
    forward calls (``calls``); the outputs are the wrapped model's, unchanged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.count = 0
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += len(x)
        self.calls += 1
        return self.model(x)


def check_query_attack(images: torch.Tensor, labels: torch.Tensor, eps: float, max_queries: int, seed: int,
                        ids: torch.Tensor | None) -> torch.Tensor:
    """Check the arguments every query attack takes; returns the ids (N,) as a CPU int64 tensor."""
    check_batch(images, labels)
    checks.positive(eps, "eps", strict=False)
    checks.positive_int(max_queries, "max_queries")
    checks.seed(seed)
    if ids is None:
        return torch.arange(len(images))
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.shape != (len(images),):
        raise UserError(f"ids must be an int64 tensor of shape ({len(images)},)")
    if len(ids) and ids.min().item() < 0:
        raise UserError("ids must be non-negative")
    return ids.cpu()


def image_generators(seed: int, ids: torch.Tensor, device: torch.device) -> list[torch.Generator]:
    """One generator per image, seeded from a hash of ``(seed, id)`` so that neighbouring seeds
    and ids give unrelated streams."""
    generators = []
    for image_id in ids.tolist():
        digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
        generators.append(torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little")))
    return generators


def prepare(points: torch.Tensor, quantise: bool) -> torch.Tensor:
    """Clip query points to [0, 1] and, if asked, round them to 8-bit levels (what the model sees)."""
    points = points.clamp(0.0, 1.0)
    return round_to_8bit(points) if quantise else points


def linf(points: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
    """(K,) float64 L-inf distances between matching rows of two (K, C, H, W) tensors."""
    return (points - origins).abs().flatten(1).amax(1).double()


__all__ = ["CountingModel", "DIST_SLACK", "QueryResult", "check_query_attack", "image_generators", "linf", "prepare"]
