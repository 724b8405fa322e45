"""The Square attack (Andriushchenko et al. 2020), L-inf, score-based: random search over the
vertices of the eps-ball with the margin loss, batched, exact query counts (``attacks.query``)."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rm_sweep import checks
from rm_sweep.attacks.base import frozen_eval, register_method
from rm_sweep.attacks.query import QueryResult, check_query_attack, image_generators, prepare
from rm_sweep.errors import UserError

# Where the paper's schedule halves p, in iterations out of 10,000; other budgets rescale it.
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# A window's signs are redrawn until the candidate changes. Only the sign vector equal to the
# window's current signs leaves it unchanged (clip(x + eps) != clip(x - eps) on [0, 1]), so a
# redraw fails with probability at most 2^-C. But when +-eps vanish in rounding (quantise with
# eps under half an 8-bit level, or eps under float resolution) none changes it: after this
# many draws the unchanged candidate is queried.
_MAX_REDRAWS = 64


def square_fraction(p_init: float, iteration: int, n_iters: int) -> float:
    """The paper's piecewise-constant schedule of p, the fraction of pixels a square covers.

    A port of ``p_selection`` in the authors' code: p starts at ``p_init`` and halves after
    10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000 iterations (rescaled to
    ``n_iters``); ``iteration`` counts from 0.
    """
    scaled = int(iteration / n_iters * 10000)
    return p_init / 2 ** bisect.bisect_left(_P_HALVINGS, scaled)


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The margin loss ``f_y - max_{k != y} f_k`` (N,) and whether the top-1 label is wrong (N,)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], -math.inf).amax(1)
    return true - other, logits.argmax(1) != labels


def square_linf(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    max_queries: int,
    p_init: float = 0.05,
    *,
    seed: int = 0,
    ids: torch.Tensor | None = None,
    quantise: bool = False,
) -> QueryResult:
    """Untargeted L-inf Square attack (Andriushchenko et al. 2020), margin loss, batched.

    Random search over the vertices of the eps-ball: start from vertical stripes (each column of
    each channel shifted by +-eps), then per iteration set one random square window of side
    ``round(sqrt(p * H * W))`` (p from ``square_fraction``) to a random +-eps per channel and
    keep it if the margin loss ``f_y - max_{k != y} f_k`` strictly drops. As in the authors'
    code, the stripes are kept whatever their loss, a window's signs are redrawn (free of
    queries) until the candidate differs from the current image, and p follows their schedule
    over the budget. Unlike their code, a window may start at any of the ``H - s + 1`` rows and
    columns (theirs never starts at the last one), and the clean image is a query: the counts
    here are theirs plus one.

    Args:
        model: classifier taking (N, C, H, W) in [0, 1], returning logits or probabilities (N, K).
        images: (N, C, H, W) floats in [0, 1], H, W >= 2; labels: (N,) int64 true classes.
        eps: L-inf radius in pixel units ([0, 1] scale, e.g. 8/255).
        max_queries: the most forward passes of any one image, the clean one included.
        p_init: the initial fraction of pixels per square (the paper: 0.05 for L-inf).
        seed, ids: image ``i`` draws from a generator keyed by ``(seed, ids[i])``; ``ids``
            defaults to 0..N-1 (non-negative int64).
        quantise: round every queried image to 8-bit levels (k/255), so the result is one.

    Returns:
        A ``QueryResult``. All images stay within eps of ``images`` (also when quantised, if
        images and eps lie on the 1/255 grid).
    """
    ids = check_query_attack(images, labels, eps, max_queries, seed, ids)
    checks.positive(p_init, "p_init")
    if p_init > 1:
        raise UserError(f"p_init must be at most 1, got {p_init!r}")
    n, channels, height, width = images.shape
    if min(height, width) < 2:
        raise UserError(f"the Square attack needs images of at least 2x2 pixels, got {height}x{width}")
    device = images.device
    # Per image only a corner and a few signs are drawn per step: CPU generators, one transfer.
    generators = image_generators(seed, ids, torch.device("cpu"))
    queries = torch.ones(n, dtype=torch.int64, device=device)
    best = images.clone()
    delta = torch.zeros_like(images)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    with frozen_eval(model), torch.no_grad():
        margin, success = _margin(model(images), labels)
        todo = (~success).nonzero().squeeze(1)
        if max_queries < 2 or eps == 0 or not len(todo):
            return QueryResult(best, queries, success)
        stripes = torch.stack([torch.randint(0, 2, (channels, 1, width), generator=generators[i])
                               for i in todo.tolist()])
        delta[todo] = (stripes.to(device, images.dtype) * 2 - 1) * eps
        best[todo] = prepare(images[todo] + delta[todo], quantise)
        margin[todo], success[todo] = _margin(model(best[todo]), labels[todo])
        queries[todo] += 1
        # The paper's budget counts from the stripes: theirs is ours minus the clean query.
        n_iters = max_queries - 1
        for iteration in range(max_queries - 2):
            todo = (~success).nonzero().squeeze(1)
            if not len(todo):
                break
            p = square_fraction(p_init, iteration, n_iters)
            side = min(max(round(math.sqrt(p * height * width)), 1), min(height, width) - 1)
            todo_ids = todo.tolist()
            corners, signs = [], []
            for i in todo_ids:
                corners.append(torch.cat([torch.randint(0, height - side + 1, (1,), generator=generators[i]),
                                          torch.randint(0, width - side + 1, (1,), generator=generators[i])]))
                signs.append(torch.randint(0, 2, (channels,), generator=generators[i]))
            top, left = torch.stack(corners).to(device).unbind(1)
            signs = torch.stack(signs).to(device)
            in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
            in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
            window = in_rows[:, None, :, None] & in_cols[:, None, None, :]
            current, origin = best[todo], images[todo]
            for _ in range(_MAX_REDRAWS):
                new_delta = torch.where(window, (signs.to(images.dtype) * 2 - 1)[:, :, None, None] * eps, delta[todo])
                candidate = prepare(origin + new_delta, quantise)
                same = (candidate == current).flatten(1).all(1).nonzero().squeeze(1)
                if not len(same):
                    break
                for j in same.tolist():
                    signs[j] = torch.randint(0, 2, (channels,), generator=generators[todo_ids[j]]).to(device)
            new_margin, fooled = _margin(model(candidate), labels[todo])
            queries[todo] += 1
            improved = new_margin < margin[todo]
            accepted = todo[improved]
            margin[accepted] = new_margin[improved]
            delta[accepted] = new_delta[improved]
            best[accepted] = candidate[improved]
            success[accepted] = fooled[improved]
    return QueryResult(best, queries, success)




@register_method("square")
@dataclass(frozen=True)
class Square:
    """Square (L-inf) within ``eps_255`` (/255), at most ``max_queries`` queries per image."""

    eps_255: float
    max_queries: int
    p_init: float = 0.05
    query: ClassVar[bool] = True

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                 ids: torch.Tensor | None = None, quantise: bool = False) -> QueryResult:
        return square_linf(model, images, labels, self.eps_255 / 255, self.max_queries, self.p_init, seed=seed,
                           ids=ids, quantise=quantise)


__all__ = ["Square", "square_fraction", "square_linf"]
