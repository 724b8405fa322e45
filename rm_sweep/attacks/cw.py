"""The Carlini-Wagner L2 attack, batched, with the binary search over its constant."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rm_sweep import checks
from rm_sweep.attacks.base import autocast, check_batch, frozen_eval, register_method, round_to_8bit


def cw_l2(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    kappa: float = 0.0,
    *,
    search_steps: int = 30,
    max_steps: int = 1000,
    lr: float = 5e-4,
    initial_const: float = 1e-3,
    abort_early: bool = True,
    quantise: bool = False,
    amp: bool = False,
) -> torch.Tensor:
    """Untargeted Carlini-Wagner L2 attack with confidence ``kappa``, batched.

    Minimises ``||x' - x||_2^2 + c * max(Z_y(x') - max_{i != y} Z_i(x') + kappa, 0)`` over
    ``x' = (tanh(w) + 1) / 2`` with Adam on the tanh-space variable ``w``, and binary-searches
    the constant ``c`` per image (start ``initial_const``, x10 until a success, then bisect).
    An iterate counts as adversarial when ``max_{i != y} Z_i > Z_y + kappa``; per image the
    adversarial with the smallest L2 seen anywhere is returned, the clean image where none was.

    Follows the authors' CW code (a port of Carlini's): ``c`` searched in (0, 1e10), the last
    of >= 10 search steps retries the upper bound, early abort when the loss stops falling
    (checked every ``max_steps // 10`` steps), and the perturbation and Adam state carry over
    from one search step to the next (Carlini's original restarts them).

    Args:
        model: classifier taking (N, C, H, W) in [0, 1], returning logits (N, K).
        images: (N, C, H, W) floats in [0, 1]; labels: (N,) int64 true classes.
        kappa: confidence margin in logits. search_steps: binary-search steps over c.
        max_steps: Adam steps per search step. lr: Adam learning rate.
        initial_const: first value of c. abort_early: stop a search step once the loss stalls.
        quantise: round the result to 8-bit levels. amp: bf16 autocast of the forwards.

    Returns:
        (N, C, H, W) images in [0, 1].
    """
    check_batch(images, labels)
    checks.positive(kappa, "kappa", strict=False)
    checks.positive_int(search_steps, "search_steps")
    checks.positive_int(max_steps, "max_steps")
    checks.positive(lr, "lr")
    checks.positive(initial_const, "initial_const")
    n = len(images)
    const_max = 1e10  # the authors' c_range upper bound; "no success yet" while upper >= const_max / 10
    # (1 - 1e-6) keeps atanh finite at pixels that are exactly 0 or 1.
    w0 = torch.atanh((images * 2 - 1) * (1 - 1e-6))
    origin = (torch.tanh(w0) + 1) / 2
    modifier = torch.zeros_like(images, requires_grad=True)
    optimizer = torch.optim.Adam([modifier], lr=lr)
    lower = torch.zeros(n, device=images.device)
    upper = torch.full((n,), const_max, device=images.device)
    const = torch.full((n,), float(initial_const), device=images.device)
    best_l2 = torch.full((n,), math.inf, device=images.device)
    best = images.clone()
    true_class = None
    check_every = max(1, max_steps // 10)
    with frozen_eval(model):
        for search_step in range(search_steps):
            if search_steps >= 10 and search_step == search_steps - 1:
                const = upper.clone()
            succeeded = torch.zeros(n, dtype=torch.bool, device=images.device)
            previous_loss = math.inf
            for step in range(max_steps):
                adversarial = (torch.tanh(w0 + modifier) + 1) / 2
                with autocast(images.device, amp):
                    logits = model(adversarial)
                logits = logits.float()
                if true_class is None:
                    true_class = F.one_hot(labels, logits.shape[1]).bool()
                l2 = (adversarial - origin).square().flatten(1).sum(1)
                real = logits.gather(1, labels[:, None]).squeeze(1)
                other = logits.masked_fill(true_class, -math.inf).amax(1)
                loss = (l2 + const * (real - other + kappa).clamp(min=0.0)).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    success = other > real + kappa
                    succeeded |= success
                    improved = success & (l2 < best_l2)
                    best_l2 = torch.where(improved, l2, best_l2)
                    best = torch.where(improved[:, None, None, None], adversarial, best)
                if abort_early and step % check_every == 0:
                    value = loss.item()
                    if value > previous_loss * (1 - 1e-4):
                        break
                    previous_loss = value
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            found = upper < const_max / 10
            const = torch.where(found, (lower + upper) / 2, torch.where(succeeded, const, const * 10))
    best = best.detach()
    return round_to_8bit(best) if quantise else best


@register_method("cw_l2")
@dataclass(frozen=True)
class CWL2:
    """CW-L2 with confidence ``kappa``: ``search_steps`` binary-search steps over c, each up to
    ``max_steps`` Adam steps of rate ``lr``, c starting at ``initial_const``."""

    kappa: float
    search_steps: int = 30
    max_steps: int = 1000
    lr: float = 5e-4
    initial_const: float = 1e-3

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, amp: bool = False) -> torch.Tensor:
        return cw_l2(model, images, labels, self.kappa, search_steps=self.search_steps, max_steps=self.max_steps,
                     lr=self.lr, initial_const=self.initial_const, amp=amp)
