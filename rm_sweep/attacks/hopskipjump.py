"""HopSkipJump (Chen et al. 2020), L-inf, decision-based: binary searches to the decision boundary,
Monte-Carlo estimates of its normal and geometric steps, all images of a batch together, exact
query counts (``attacks.query``)."""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rm_sweep import checks
from rm_sweep.attacks.base import frozen_eval, register_method
from rm_sweep.attacks.query import DIST_SLACK, QueryResult, check_query_attack, image_generators, linf, prepare


class _Decisions:
    """The model's top-1 decisions on points made from the images, counted per image.

    Also keeps, per image, the closest (L-inf) point it has seen classified adversarial: that
    point is the attack's result, and an image is done once it lies within eps.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, max_queries: int,
                 quantise: bool, max_batch: int) -> None:
        self.model, self.images, self.labels = model, images, labels
        self.eps, self.max_queries, self.quantise, self.max_batch = eps, max_queries, quantise, max_batch
        n = len(images)
        self.queries = torch.zeros(n, dtype=torch.int64, device=images.device)
        self.best = images.clone()
        self.best_dist = torch.full((n,), math.inf, dtype=torch.float64, device=images.device)

    def prepare(self, points: torch.Tensor) -> torch.Tensor:
        return prepare(points, self.quantise)

    def active(self, idx: torch.Tensor) -> torch.Tensor:
        """(K,) bool: which of the images ``idx`` are neither done nor out of queries."""
        return (self.best_dist[idx] > self.eps + DIST_SLACK) & (self.queries[idx] < self.max_queries)

    def remaining(self, idx: torch.Tensor) -> torch.Tensor:
        return self.max_queries - self.queries[idx]

    def __call__(self, points: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """Whether the model misclassifies each of ``points`` (K, C, H, W), made from the images
        ``owners`` (K,); the caller keeps every owner within its budget."""
        predictions = torch.cat([self.model(chunk).argmax(1) for chunk in points.split(self.max_batch)])
        adversarial = predictions != self.labels[owners]
        self.queries.index_add_(0, owners, torch.ones_like(owners))
        dist = torch.where(adversarial, linf(points, self.images[owners]), math.inf)
        closest = torch.full_like(self.best_dist, math.inf).scatter_reduce(0, owners, dist, "amin")
        improved = (closest < self.best_dist).nonzero().squeeze(1)
        if len(improved):
            # The first of an image's points at its smallest distance (deterministic on ties).
            hit = (dist == closest[owners]) & (closest[owners] < self.best_dist[owners])
            order = torch.arange(len(points), device=points.device)
            first = torch.full_like(self.queries, len(points)).scatter_reduce(0, owners[hit], order[hit], "amin")
            self.best[improved] = points[first[improved]]
            self.best_dist[improved] = closest[improved]
        return adversarial

    def result(self) -> QueryResult:
        success = self.best_dist <= self.eps + DIST_SLACK
        adversarial = torch.where(success[:, None, None, None], self.best, self.images)
        return QueryResult(adversarial, self.queries, success)


def _bisect(decide: _Decisions, idx: torch.Tensor, interpolate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            high: torch.Tensor, upper: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Binary search of all images ``idx`` together for the smallest adversarial ``alpha``.

    ``interpolate(rows, alpha)`` gives the points of the images ``idx[rows]`` at ``alpha`` (K,);
    ``high`` (K,) is an adversarial alpha whose point is ``upper``; each image bisects
    ``[0, high]`` until the interval is at most its ``threshold`` or its queries run out.
    Returns the points at the final highs (each one queried and found adversarial).
    """
    low, high, upper = torch.zeros_like(high), high.clone(), upper.clone()
    while True:
        rows = ((high - low > threshold) & decide.active(idx)).nonzero().squeeze(1)
        if not len(rows):
            return upper
        mid = (high[rows] + low[rows]) / 2
        points = decide.prepare(interpolate(rows, mid))
        adversarial = decide(points, idx[rows])
        low[rows[~adversarial]] = mid[~adversarial]
        high[rows[adversarial]] = mid[adversarial]
        upper[rows[adversarial]] = points[adversarial]


def _project(points: torch.Tensor, origins: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Clip each of ``points`` into the L-inf ball of its ``radius`` (K,) around its origin."""
    radius = radius.to(points.dtype)[:, None, None, None]
    return torch.min(torch.max(points, origins - radius), origins + radius)


def _linf_boundary(decide: _Decisions, idx: torch.Tensor, points: torch.Tensor,
                   theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """HSJA's L-inf binary search towards the images from adversarial ``points``: shrink the
    ball around each image until the point clipped into it is just adversarial (to within
    ``min(theta * dist, theta)``). Returns the boundary points and the distances of ``points``
    (which the authors' code, not the paper, feeds to the next probe size)."""
    origins = decide.images[idx]
    dist = linf(points, origins)
    return _bisect(decide, idx, lambda rows, alpha: _project(points[rows], origins[rows], alpha), dist, points,
                   dist.clamp(max=1.0) * theta), dist


def _random_start(decide: _Decisions, idx: torch.Tensor, generators: list[torch.Generator]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform noise images, drawn until one is misclassified (one query per draw), then blended
    towards the image by a binary search to 0.001 (Foolbox's BlendedUniformNoiseAttack, as in
    the authors' code). Returns the images that found a start and their starts."""
    origins = decide.images[idx]
    starts = origins.clone()
    found = torch.zeros(len(idx), dtype=torch.bool, device=idx.device)
    while True:
        rows = (~found & decide.active(idx)).nonzero().squeeze(1)
        if not len(rows):
            break
        noise = torch.stack([torch.rand(origins.shape[1:], generator=generators[i], device=origins.device,
                                        dtype=origins.dtype) for i in idx[rows].tolist()])
        noise = decide.prepare(noise)
        adversarial = decide(noise, idx[rows])
        starts[rows[adversarial]] = noise[adversarial]
        found[rows[adversarial]] = True
    idx, origins, noise = idx[found], origins[found], starts[found]

    def blend(rows: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        alpha = alpha.to(origins.dtype)[:, None, None, None]
        return (1 - alpha) * origins[rows] + alpha * noise[rows]

    ones = torch.ones(len(idx), dtype=torch.float64, device=idx.device)
    return idx, _bisect(decide, idx, blend, ones, noise, ones * 0.001)


def _gradient_sign(decide: _Decisions, idx: torch.Tensor, boundary: torch.Tensor, delta: torch.Tensor,
                   num_evals: int, generators: list[torch.Generator]) -> torch.Tensor:
    """HSJA's Monte-Carlo estimate of the boundary's normal at each of ``boundary`` (K, C, H, W),
    L-inf version: ``num_evals`` probes (fewer where an image's queries run out) of uniform
    directions scaled to L2 norm ``delta`` (K,), clipped to [0, 1], their decisions baseline-
    corrected (the authors' code: plain mean of the directions when all decisions agree).
    Returns the sign of the estimate (K, C, H, W), the L-inf update direction."""
    counts = decide.remaining(idx).clamp(max=num_evals).tolist()
    total = torch.zeros_like(boundary)
    weighted = torch.zeros_like(boundary)
    votes = torch.zeros(len(idx), dtype=boundary.dtype, device=boundary.device)
    # Groups of images whose probes fill at most one forward pass (or one image's probes, which
    # the oracle then splits): bounds the memory the probes take.
    bounds, filled = [0], 0
    for row, count in enumerate(counts):
        if row > bounds[-1] and filled + count > decide.max_batch:
            bounds.append(row)
            filled = 0
        filled += count
    bounds.append(len(counts))
    for start, stop in zip(bounds, bounds[1:]):
        rows = torch.arange(start, stop, device=idx.device)
        owner_rows = rows.repeat_interleave(torch.tensor(counts[start:stop], device=idx.device))
        directions = torch.cat([
            torch.rand((count, *boundary.shape[1:]), generator=generators[i], device=boundary.device,
                       dtype=boundary.dtype) * 2 - 1
            for i, count in zip(idx[start:stop].tolist(), counts[start:stop])
        ])
        directions /= directions.flatten(1).norm(dim=1)[:, None, None, None]
        scale = delta[owner_rows].to(boundary.dtype)[:, None, None, None]
        probes = decide.prepare(boundary[owner_rows] + scale * directions)
        adversarial = decide(probes, idx[owner_rows])
        directions = (probes - boundary[owner_rows]) / scale  # the clipped directions
        signs = adversarial.to(boundary.dtype) * 2 - 1
        total.index_add_(0, owner_rows, directions)
        weighted.index_add_(0, owner_rows, directions * signs[:, None, None, None])
        votes.index_add_(0, owner_rows, signs)
    mean_vote = votes / torch.tensor(counts, dtype=boundary.dtype, device=boundary.device)
    # sum((f - mean f) * u) = sum(f * u) - mean f * sum(u). With all f equal that is 0, and the
    # authors' code uses +sum(u) (all probes adversarial) or -sum(u) (none) instead.
    agreed = (mean_vote.abs() == 1)[:, None, None, None]
    gradient = torch.where(agreed, mean_vote[:, None, None, None] * total,
                           weighted - mean_vote[:, None, None, None] * total)
    return gradient.sign()


def _geometric_step(decide: _Decisions, idx: torch.Tensor, boundary: torch.Tensor, update: torch.Tensor,
                    step: torch.Tensor) -> torch.Tensor:
    """HSJA's geometric step-size search: from ``step`` (K,), halve until ``boundary + step *
    update`` (clipped to [0, 1]) is adversarial; returns those points (``boundary`` where an
    image ran out of queries first)."""
    step, stepped = step.clone(), boundary.clone()
    found = torch.zeros(len(idx), dtype=torch.bool, device=idx.device)
    while True:
        rows = (~found & decide.active(idx)).nonzero().squeeze(1)
        if not len(rows):
            return stepped
        points = decide.prepare(boundary[rows] + step[rows].to(boundary.dtype)[:, None, None, None] * update[rows])
        adversarial = decide(points, idx[rows])
        stepped[rows[adversarial]] = points[adversarial]
        found[rows[adversarial]] = True
        step[rows[~adversarial]] /= 2


def hop_skip_jump(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    max_queries: int,
    *,
    seed: int = 0,
    ids: torch.Tensor | None = None,
    quantise: bool = False,
    gamma: float = 1.0,
    init_evals: int = 100,
    max_evals: int = 10_000,
    max_batch: int = 1024,
) -> QueryResult:
    """Untargeted L-inf HopSkipJump (Chen et al. 2020), decision-based, batched.

    A minimum-distance attack that needs only the top-1 label: start from uniform noise that
    the model misclassifies, blended towards the image; then repeat (t = 1, 2, ...) a binary
    search to the decision boundary in the L-inf geometry (clip into a shrinking ball), an
    estimate of the boundary's normal from ``min(init_evals * sqrt(t), max_evals)`` random
    probes of size ``delta``, and a geometric step ``dist / sqrt(t)`` (halved until adversarial)
    along its sign. As in the authors' ``hsja.py``: binary-search threshold ``theta = gamma /
    d^2`` (d = C*H*W), ``delta = 0.1`` at t = 1 and ``d * theta * dist`` after (dist before
    the last binary search), baseline-corrected probe votes. ART's port differs: theta
    ``0.01 / d``, and no binary search after the last step.

    For an eps-bounded threat model, every point queried is a candidate: the result is the
    closest (L-inf) point the model misclassified, and an image stops as soon as it has one
    within ``eps`` (so ``queries`` counts queries to success). All images run each phase
    together: every step of a binary search, every step-size try and all probes of an
    iteration are one forward pass (split into passes of at most ``max_batch`` images).

    Args:
        model: classifier taking (N, C, H, W) in [0, 1]; only ``argmax`` of its output is used.
        images: (N, C, H, W) floats in [0, 1]; labels: (N,) int64 true classes.
        eps: L-inf radius in pixel units ([0, 1] scale) that counts as success.
        max_queries: the most forward passes of any one image, the clean one included.
        seed, ids: image ``i`` draws from a generator keyed by ``(seed, ids[i])``; ``ids``
            defaults to 0..N-1 (non-negative int64).
        quantise: round every queried image to 8-bit levels (k/255). Probes smaller than half a
            level then vanish, which weakens the gradient estimate: the threat is a model that
            only ever sees 8-bit images.
        gamma, init_evals, max_evals: HSJA's parameters (the paper's 1.0, 100, 10,000).
        max_batch: the most images in one forward pass.

    Returns:
        A ``QueryResult``: where ``success``, an adversarial within eps (up to 1e-6 of float
        rounding); elsewhere the input image.
    """
    ids = check_query_attack(images, labels, eps, max_queries, seed, ids)
    checks.positive(gamma, "gamma")
    checks.positive_int(init_evals, "init_evals")
    checks.positive_int(max_evals, "max_evals")
    checks.positive_int(max_batch, "max_batch")
    d = images[0].numel()
    theta = gamma / d**2
    decide = _Decisions(model, images, labels, eps, max_queries, quantise, max_batch)
    generators = image_generators(seed, ids, images.device)
    with frozen_eval(model), torch.no_grad():
        idx = torch.arange(len(images), device=images.device)
        decide(images, idx)  # an image misclassified clean is done, at distance 0
        idx, starts = _random_start(decide, idx[decide.active(idx)], generators)
        boundary, dist_before = _linf_boundary(decide, idx, starts, theta)
        for t in itertools.count(1):
            keep = decide.active(idx)
            idx, boundary, dist_before = idx[keep], boundary[keep], dist_before[keep]
            if not len(idx):
                break
            delta = torch.full_like(dist_before, 0.1) if t == 1 else d * theta * dist_before
            num_evals = min(int(init_evals * math.sqrt(t)), max_evals)
            update = _gradient_sign(decide, idx, boundary, delta, num_evals, generators)
            keep = decide.active(idx)
            idx, boundary, update = idx[keep], boundary[keep], update[keep]
            dist = linf(boundary, images[idx])
            stepped = _geometric_step(decide, idx, boundary, update, dist / math.sqrt(t))
            keep = decide.active(idx)
            idx, stepped = idx[keep], stepped[keep]
            boundary, dist_before = _linf_boundary(decide, idx, stepped, theta)
    return decide.result()


@register_method("hop_skip_jump")
@dataclass(frozen=True)
class HopSkipJump:
    """HopSkipJump (L-inf) counting success within ``eps_255`` (/255), at most ``max_queries``
    queries per image; ``gamma``, ``init_evals``, ``max_evals`` as in the paper."""

    eps_255: float
    max_queries: int
    gamma: float = 1.0
    init_evals: int = 100
    max_evals: int = 10_000
    query: ClassVar[bool] = True

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                 ids: torch.Tensor | None = None, quantise: bool = False) -> QueryResult:
        return hop_skip_jump(model, images, labels, self.eps_255 / 255, self.max_queries, seed=seed, ids=ids,
                             quantise=quantise, gamma=self.gamma, init_evals=self.init_evals,
                             max_evals=self.max_evals)


__all__ = ["HopSkipJump", "hop_skip_jump"]
