"""Gradient attacks, batched: FGSM and PGD (the paper's basic iterative method), and MI-FGSM,
which the authors' code has (``Attacks/mifgsm.py``) but the paper does not report.

One forward and one backward pass per step for the whole batch, gradients with respect to the
input only, bounds computed once; the model in eval mode with frozen parameters meanwhile.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rm_sweep import checks
from rm_sweep.attacks.base import check_batch, frozen_eval, input_gradient, register_method, round_to_8bit


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float, steps: int,
        random_start: bool = False, *, seed: int = 0, quantise: bool = False, amp: bool = False) -> torch.Tensor:
    """L-inf PGD, the paper's basic iterative method (Kurakin et al.): repeated FGSM steps.

    Each step: ``x <- x + step * sign(grad_x CE(model(x), labels))``, then projection onto
    the L-inf ball of radius ``eps`` around ``images`` and clipping to [0, 1].

    Args:
        model: classifier taking (N, C, H, W) in [0, 1], returning logits (N, K).
        images: (N, C, H, W) floats in [0, 1]; labels: (N,) int64 true classes.
        eps: L-inf radius in pixel units ([0, 1] scale, e.g. 8/255).
        step: step size in pixel units; steps: number of steps.
        random_start: start from a uniform point in the ball (Madry et al.); the paper does not.
        seed: seeds the random start.
        quantise: round the result to 8-bit levels (k/255).
        amp: bf16 autocast of the forward passes (CUDA speed-up; not bit-exact).

    Returns:
        Adversarial images (N, C, H, W) in [0, 1] with ``|x_adv - images| <= eps`` everywhere
        (exactly, up to float rounding; also after quantisation when images and eps are on the
        1/255 grid).
    """
    return _iterate(model, images, labels, eps, step, steps, torch.Tensor.sign_, random_start=random_start, seed=seed,
                    quantise=quantise, amp=amp)


def mifgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float, steps: int,
           decay: float = 1.0, *, quantise: bool = False, amp: bool = False) -> torch.Tensor:
    """L-inf MI-FGSM (Dong et al. 2018): PGD steps along the sign of an accumulated momentum.

    Each step: ``g <- decay * g + grad / ||grad||_1`` (the L1 norm of each image's own
    gradient of the cross-entropy loss), ``x <- x + step * sign(g)``, then projection onto the
    L-inf ball of radius ``eps`` around ``images`` and clipping to [0, 1]. No random start. The
    authors' ``Attacks/mifgsm.py`` runs (step, steps, eps) = (1, 10, 8), (1, 20, 16), (1, 40, 32)
    and (2, 10, 16), (2, 20, 32) in /255 units, with ``decay = 1``. (They normalise by the L1
    norm of the gradient with respect to the *standardised* input, which weights channels by
    their std; here, as in the paper and ART, it is the gradient with respect to the [0, 1] image.)

    Args:
        model: classifier taking (N, C, H, W) in [0, 1], returning logits (N, K).
        images: (N, C, H, W) floats in [0, 1]; labels: (N,) int64 true classes.
        eps: L-inf radius in pixel units ([0, 1] scale, e.g. 8/255).
        step: step size in pixel units; steps: number of steps.
        decay: momentum decay factor mu (Dong et al.: 1.0); 0 turns MI-FGSM into ``pgd``.
        quantise: round the result to 8-bit levels (k/255).
        amp: bf16 autocast of the forward passes (CUDA speed-up; not bit-exact).

    Returns:
        Adversarial images (N, C, H, W) in [0, 1] with ``|x_adv - images| <= eps`` everywhere
        (up to float rounding), as for ``pgd``.
    """
    checks.positive(decay, "decay", strict=False)
    momentum: list[torch.Tensor] = []  # g, created at the first step

    def direction(grad: torch.Tensor) -> torch.Tensor:
        # The smallest positive float keeps an all-zero gradient (a saturated loss) at zero
        # instead of 0/0; ART does the same by leaving such a gradient unnormalised.
        l1 = grad.abs().flatten(1).sum(1).clamp_(min=torch.finfo(grad.dtype).tiny).view(-1, 1, 1, 1)
        if not momentum:
            momentum.append(torch.zeros_like(grad))
        return momentum[0].mul_(decay).add_(grad.div_(l1)).sign()

    return _iterate(model, images, labels, eps, step, steps, direction, quantise=quantise, amp=amp)


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *, quantise: bool = False,
         amp: bool = False) -> torch.Tensor:
    """FGSM (Goodfellow et al.): ``clip(images + eps * sign(grad_x CE), 0, 1)``; one PGD step of size eps.

    Shapes, ranges and flags as in ``pgd``; ``eps`` in pixel units.
    """
    return pgd(model, images, labels, eps, eps, 1, quantise=quantise, amp=amp)


def _iterate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float, steps: int,
             direction: Callable[[torch.Tensor], torch.Tensor], *, random_start: bool = False, seed: int = 0,
             quantise: bool, amp: bool) -> torch.Tensor:
    """``steps`` times ``x <- x + step * direction(grad_x CE)``, then projection onto the L-inf
    ball of radius ``eps`` around ``images`` and clipping to [0, 1]; from ``images``, or a
    uniform point in the ball (``random_start``, seeded)."""
    check_batch(images, labels)
    checks.positive(eps, "eps", strict=False)
    checks.positive(step, "step")
    checks.positive_int(steps, "steps")
    # The ball and [0, 1] intersect (images lie in [0, 1]), so clamping to their intersection
    # equals projecting onto the ball and then clipping to [0, 1].
    lower = (images - eps).clamp_(min=0.0)
    upper = (images + eps).clamp_(max=1.0)
    x = images.clone()
    if random_start:
        generator = torch.Generator(device=images.device).manual_seed(seed)
        noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        x.add_(noise.mul_(2 * eps).sub_(eps)).clamp_(lower, upper)
    with frozen_eval(model):
        for _ in range(steps):
            x.add_(direction(input_gradient(model, x, labels, amp)), alpha=step).clamp_(lower, upper)
    return round_to_8bit(x) if quantise else x


@register_method("fgsm")
@dataclass(frozen=True)
class FGSM:
    """FGSM with budget ``eps_255`` (/255)."""

    eps_255: float

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, amp: bool = False) -> torch.Tensor:
        return fgsm(model, images, labels, self.eps_255 / 255, amp=amp)


@register_method("pgd")
@dataclass(frozen=True)
class PGD:
    """PGD: ``steps`` steps of ``step_255`` within ``eps_255`` (/255); the paper has no random start."""

    eps_255: float
    step_255: float
    steps: int
    random_start: bool = False

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, amp: bool = False) -> torch.Tensor:
        return pgd(model, images, labels, self.eps_255 / 255, self.step_255 / 255, self.steps, self.random_start,
                   amp=amp)


@register_method("mifgsm")
@dataclass(frozen=True)
class MIFGSM:
    """MI-FGSM: ``steps`` momentum steps of ``step_255`` within ``eps_255`` (/255), decay ``decay``."""

    eps_255: float
    step_255: float
    steps: int
    decay: float = 1.0

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, amp: bool = False) -> torch.Tensor:
        return mifgsm(model, images, labels, self.eps_255 / 255, self.step_255 / 255, self.steps, self.decay, amp=amp)
