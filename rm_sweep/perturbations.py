"""The non-adversarial perturbations of the paper: Gaussian noise (Sec. 3.1.2) and patch shuffle (App. A).

Both are pure functions of (seed, test-set index) per image, so every target sees the same noisy
or shuffled images whatever the batch size, device or subset.
"""
from __future__ import annotations

import numpy as np
import torch

from rm_sweep import checks
from rm_sweep.errors import UserError
from rm_sweep.evaluate import check_indices


def _image_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for one image: perturbations depend on (seed, test-set index) only.

    The pair is hashed by NumPy's SeedSequence because torch's CPU generator keeps only
    32 bits of its seed (so ``(seed << 32) + index`` would ignore the seed).
    """
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def check_sigma(sigma_255: float) -> float:
    """A noise level: a finite number >= 0 in /255 units."""
    return checks.positive(sigma_255, "noise sigma (in /255 units)", strict=False)


def check_grid(n: int, height: int, width: int) -> None:
    checks.positive_int(n, "patch grid size n")
    if height % n or width % n:
        raise UserError(f"a {height}x{width} image cannot be cut into {n}x{n} equal patches")


def gaussian_noise(
    images: torch.Tensor, sigma_255: float, *, seed: int = 0, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """Images plus i.i.d. N(0, sigma^2) noise clipped to [-2 sigma, 2 sigma], then clipped to [0, 1].

    Args:
        images: (N, C, H, W) floats in [0, 1]. sigma_255: sigma in /255 units (the paper's
            1, 2, 4, ..., 32). seed, indices: the noise of image i is drawn from (seed, indices[i]).

    Returns:
        (N, C, H, W) floats in [0, 1], on the images' device.
    """
    check_sigma(sigma_255)
    checks.seed(seed)
    indices = check_indices(indices, len(images))
    sigma = sigma_255 / 255
    shape = images.shape[1:]
    draws = torch.stack(
        [torch.randn(shape, generator=_image_generator(seed, int(i))) for i in indices]
    ) if len(images) else torch.zeros(images.shape)
    noise = draws.mul_(sigma).clamp_(-2 * sigma, 2 * sigma).to(images.device, images.dtype)
    return (images + noise).clamp_(0.0, 1.0)


def shuffle_patches(
    images: torch.Tensor, n: int, *, seed: int = 0, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """Cut each image into an n x n grid of patches and permute the patches at random.

    One permutation per image, shared by its channels, drawn from (seed, indices[i]).
    Height and width must be divisible by ``n``.

    Args:
        images: (N, C, H, W), any dtype. n: patches per side (the paper: 2, 4, 8).

    Returns:
        (N, C, H, W), same dtype and device; patch slot j of image i holds the input's patch
        ``perm_i[j]`` (slots in row-major order).
    """
    count, channels, height, width = images.shape
    check_grid(n, height, width)
    checks.seed(seed)
    indices = check_indices(indices, count)
    ph, pw = height // n, width // n
    patches = images.reshape(count, channels, n, ph, n, pw).permute(0, 2, 4, 1, 3, 5).reshape(count, n * n, -1)
    permutations = torch.stack(
        [torch.randperm(n * n, generator=_image_generator(seed, int(i))) for i in indices]
    ) if count else torch.zeros((0, n * n), dtype=torch.int64)
    permutations = permutations.to(images.device)
    shuffled = patches.gather(1, permutations[:, :, None].expand_as(patches))
    return shuffled.reshape(count, n, n, channels, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(images.shape)


__all__ = ["check_grid", "check_sigma", "gaussian_noise", "shuffle_patches"]
