"""The paper's evaluation protocols, each returning counts (DESIGN.md, "Black-box protocol").

- ``craft(source, ...)``: attack the first ``limit`` test images the source classifies
  correctly and keep the adversarials that fool it: an ``AdversarialSet`` with provenance,
  crafted once per (source, setting) and reused for every target.
- ``defense(target, adversarial_set)``: of the kept adversarials whose clean image the
  target classifies correctly (``n_evaluated``), how many it still classifies correctly
  (``n_defended``). Black-box (source and target differ) and gray-box (same architecture and
  settings, another seed or mask seed) are ``defense`` with the matching source and target.
- ``white_box(adversarial_set)``: the source attacked by its own adversarials. Every
  attacked image counts (``n_evaluated = n_crafted``; all of them are classified correctly
  clean by construction) and the defended ones are those the attack failed on. (Counting
  only the kept set, as ``defense`` does, would give 0 by construction.)
- ``noise`` / ``patch_shuffle``: Gaussian noise (sigma/255, clipped to +-2 sigma) and
  patch shuffling (n x n patches permuted). ``n_crafted`` = images perturbed,
  ``n_fooled_source`` = None (there is no source), ``n_evaluated`` = those among them the
  target classifies correctly when clean, ``n_defended`` = those of these it still
  classifies correctly perturbed (the authors' shuffle test likewise used correctly
  classified images only).

Images go in as (N, C, H, W) uint8 (read as k/255) or floats in [0, 1]; labels as (N,) int64.
Random perturbations are a pure function of (seed, test-set index), so every target sees
the same noisy or shuffled images whatever the batch size, device or subset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rm_sweep.attacks import AttackSetting, check_batch, frozen_eval, get_setting
from rm_sweep.errors import UserError

__all__ = [
    "AdversarialSet",
    "DefenseCounts",
    "Protocol",
    "craft",
    "defense",
    "gaussian_noise",
    "noise",
    "patch_shuffle",
    "perturbation",
    "predict",
    "shuffle_patches",
    "white_box",
]


class Protocol(str, Enum):
    """The ``protocol`` column of the store's matrix table."""

    BLACK = "black"
    GRAY = "gray"
    WHITE = "white"
    NOISE = "noise"
    SHUFFLE = "shuffle"


@dataclass(frozen=True)
class DefenseCounts:
    """Counts of one (source, target, attack, protocol) fact.

    Attributes:
        n_crafted: images attacked or perturbed.
        n_fooled_source: adversarials that fooled the source (None for noise and shuffle).
        n_evaluated: adversarials / perturbed images whose clean image the target classifies
            correctly (white-box: every attacked image).
        n_defended: of those, the ones the target still classifies correctly.
    """

    n_crafted: int
    n_fooled_source: int | None
    n_evaluated: int
    n_defended: int

    @classmethod
    def from_verdicts(cls, clean_ok: torch.Tensor, attacked_ok: torch.Tensor, *, n_crafted: int,
                      n_fooled_source: int | None) -> DefenseCounts:
        """The counts from the target's verdicts, (M,) bool each: is the clean image classified
        correctly, is its adversarial or perturbed version. Only images the target gets right
        clean are evaluated."""
        return cls(n_crafted=n_crafted, n_fooled_source=n_fooled_source, n_evaluated=int(clean_ok.sum()),
                   n_defended=int((clean_ok & attacked_ok).sum()))

    @property
    def defense_rate(self) -> float:
        """n_defended / n_evaluated; NaN when nothing was evaluated."""
        return self.n_defended / self.n_evaluated if self.n_evaluated else math.nan

    def as_dict(self) -> dict[str, Any]:
        """The counts and the rate, keyed as the store's matrix columns."""
        return {
            "n_crafted": self.n_crafted,
            "n_fooled_source": self.n_fooled_source,
            "n_evaluated": self.n_evaluated,
            "n_defended": self.n_defended,
            "defense_rate": self.defense_rate,
        }


@dataclass(frozen=True, eq=False)
class AdversarialSet:
    """Adversarial images that fooled their source, with provenance; plain CPU tensors,
    so the set pickles compactly (Ray's object store).

    Attributes:
        source_id: the source model's (or ensemble's) id.
        setting: the attack setting's name; params: its ``AttackSetting.params()``.
        limit: at most this many correctly classified images were attacked.
        n_crafted: images attacked (the first ``n_crafted`` the source classifies correctly).
        indices: (M,) int64 test-set indices of the kept images (they fooled the source).
        labels: (M,) int64 true classes.
        clean: (M, C, H, W) clean images, uint8 (0..255) or float32 in [0, 1] as given.
        adversarial: (M, C, H, W) uint8 when the setting quantises, else float32 in [0, 1].
    """

    source_id: str
    setting: str
    params: dict[str, Any]
    limit: int
    n_crafted: int
    indices: torch.Tensor
    labels: torch.Tensor
    clean: torch.Tensor
    adversarial: torch.Tensor

    def __post_init__(self) -> None:
        m = len(self.indices)
        if not (len(self.labels) == len(self.clean) == len(self.adversarial) == m):
            raise UserError("adversarial set: indices, labels, clean and adversarial differ in length")
        if self.clean.shape != self.adversarial.shape:
            raise UserError("adversarial set: clean and adversarial images differ in shape")
        if m > self.n_crafted:
            raise UserError(f"adversarial set: {m} kept adversarials but only {self.n_crafted} crafted")

    @property
    def n_fooled_source(self) -> int:
        """Adversarials that fooled the source: every image in the set."""
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (k) -> float32 k/255; floats unchanged."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")


def _check_indices(indices: torch.Tensor | None, n: int) -> torch.Tensor:
    if indices is None:
        return torch.arange(n)
    if not isinstance(indices, torch.Tensor) or indices.shape != (n,) or indices.dtype != torch.int64:
        raise UserError(f"indices must be an int64 tensor of shape ({n},)")
    return indices.cpu()


def predict(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 512, device: torch.device | str | None = None
) -> torch.Tensor:
    """Predicted classes (N,) int64 on the CPU for images (N, C, H, W), uint8 or floats in [0, 1].

    The model runs in eval mode; its modes are restored after.
    """
    _check_positive("batch_size", batch_size)
    device = torch.device(device) if device is not None else _model_device(model)
    out = []
    with frozen_eval(model), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = _as_float(images[start : start + batch_size].to(device, non_blocking=True))
            out.append(model(batch).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _first_correct(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, limit: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Positions of the first ``limit`` images the model classifies correctly (stops early)."""
    found: list[torch.Tensor] = []
    count = 0
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        correct = predict(model, images[start:stop], batch_size=batch_size, device=device) == labels[start:stop].cpu()
        positions = correct.nonzero().flatten() + start
        found.append(positions)
        count += len(positions)
        if count >= limit:
            break
    return torch.cat(found)[:limit] if found else torch.zeros(0, dtype=torch.int64)


def _resolve(setting: AttackSetting | str) -> AttackSetting:
    return get_setting(setting) if isinstance(setting, str) else setting


def craft(
    source: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    setting: AttackSetting | str,
    limit: int | None = None,
    *,
    source_id: str = "",
    indices: torch.Tensor | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp: bool = False,
    progress: bool = False,
) -> AdversarialSet:
    """Attack the first ``limit`` images the source classifies correctly; keep those that fool it.

    Args:
        source: the model (or ``Ensemble``) attacked.
        images: (N, C, H, W) test images, uint8 or floats in [0, 1], in test-set order.
        labels: (N,) int64.
        setting: an ``AttackSetting`` or its name in ``SETTINGS``.
        limit: how many correctly classified images to attack (default: the setting's,
            5000 for FGSM/PGD and 1000 for CW).
        source_id: recorded in the set. indices: (N,) test-set indices of ``images``
            (default 0..N-1).
        batch_size: images per attack batch. device: where to attack (default: the
            source's device). amp: bf16 autocast. progress: show a progress bar.

    Returns:
        The kept adversarials, judged on the images as stored (after quantisation).
    """
    setting = _resolve(setting)
    check_batch(images, labels, allow_uint8=True)
    limit = setting.limit if limit is None else limit
    _check_positive("limit", limit)
    _check_positive("batch_size", batch_size)
    indices = _check_indices(indices, len(images))
    device = torch.device(device) if device is not None else _model_device(source)
    chosen = _first_correct(source, images, labels, limit, batch_size, device)
    kept: list[torch.Tensor] = []
    adversarials: list[torch.Tensor] = []
    starts = range(0, len(chosen), batch_size)
    for start in tqdm(starts, desc=f"craft {setting.name}", unit="batch", disable=not progress):
        positions = chosen[start : start + batch_size]
        x = _as_float(images[positions].to(device))
        y = labels[positions].to(device)
        adversarial = setting.run(source, x, y, amp=amp)
        fooled = (predict(source, adversarial, batch_size=batch_size, device=device) != y.cpu())
        kept.append(positions[fooled])
        adversarials.append(adversarial[fooled.to(device)].cpu())
    positions = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)
    adversarial = torch.cat(adversarials) if adversarials else torch.zeros((0, *images.shape[1:]))
    if setting.quantise:
        adversarial = adversarial.mul(255).round_().to(torch.uint8)
    else:
        adversarial = adversarial.float()
    clean = images[positions].cpu()
    return AdversarialSet(
        source_id=source_id,
        setting=setting.name,
        params=setting.params(),
        limit=limit,
        n_crafted=len(chosen),
        indices=indices[positions],
        labels=labels[positions].cpu(),
        clean=clean if clean.dtype == torch.uint8 else clean.float(),
        adversarial=adversarial,
    )


def defense(
    target: nn.Module,
    adversarial_set: AdversarialSet,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> DefenseCounts:
    """The target's defense against a crafted set (black-box or gray-box).

    ``n_evaluated``: kept adversarials whose clean image the target classifies correctly;
    ``n_defended``: of those, the ones whose adversarial it still classifies correctly.
    """
    labels = adversarial_set.labels
    clean_ok = predict(target, adversarial_set.clean, batch_size=batch_size, device=device) == labels
    adversarial_ok = predict(target, adversarial_set.adversarial, batch_size=batch_size, device=device) == labels
    return DefenseCounts.from_verdicts(clean_ok, adversarial_ok, n_crafted=adversarial_set.n_crafted,
                                       n_fooled_source=adversarial_set.n_fooled_source)


def white_box(adversarial_set: AdversarialSet) -> DefenseCounts:
    """White-box counts of the set's own source: of the ``n_crafted`` attacked images (all
    classified correctly clean), those the attack failed on are defended."""
    return DefenseCounts(
        n_crafted=adversarial_set.n_crafted,
        n_fooled_source=adversarial_set.n_fooled_source,
        n_evaluated=adversarial_set.n_crafted,
        n_defended=adversarial_set.n_crafted - adversarial_set.n_fooled_source,
    )


def _image_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for one image: perturbations depend on (seed, test-set index) only.

    The pair is hashed by NumPy's SeedSequence because torch's CPU generator keeps only
    32 bits of its seed (so ``(seed << 32) + index`` would ignore the seed).
    """
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def _check_sigma(sigma_255: float) -> None:
    if isinstance(sigma_255, bool) or not isinstance(sigma_255, (int, float)) or not 0 <= sigma_255 < math.inf:
        raise UserError(f"noise sigma must be a finite number >= 0 (in /255 units), got {sigma_255!r}")


def _check_grid(n: int, height: int, width: int) -> None:
    _check_positive("patch grid size n", n)
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
    _check_sigma(sigma_255)
    _check_seed(seed)
    indices = _check_indices(indices, len(images))
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
    _check_grid(n, height, width)
    _check_seed(seed)
    indices = _check_indices(indices, count)
    ph, pw = height // n, width // n
    patches = images.reshape(count, channels, n, ph, n, pw).permute(0, 2, 4, 1, 3, 5).reshape(count, n * n, -1)
    permutations = torch.stack(
        [torch.randperm(n * n, generator=_image_generator(seed, int(i))) for i in indices]
    ) if count else torch.zeros((0, n * n), dtype=torch.int64)
    permutations = permutations.to(images.device)
    shuffled = patches.gather(1, permutations[:, :, None].expand_as(patches))
    return shuffled.reshape(count, n, n, channels, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(images.shape)


def perturbation(protocol: str, value: float, *, seed: int = 0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ``noise`` (``value`` = sigma in /255, as ``gaussian_noise``) or ``shuffle`` (``value`` =
    patches per side, as ``shuffle_patches``) perturbation, as a function of a batch of images
    (B, C, H, W) in [0, 1] and their (B,) test-set indices."""
    if protocol == Protocol.NOISE:
        return lambda x, indices: gaussian_noise(x, value, seed=seed, indices=indices)
    if protocol == Protocol.SHUFFLE:
        return lambda x, indices: shuffle_patches(x, int(value), seed=seed, indices=indices)
    raise ValueError(f"no perturbation for protocol {protocol!r}")


def _perturbation_counts(
    target: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    limit: int | None,
    indices: torch.Tensor | None,
    batch_size: int,
    device: torch.device | str | None,
) -> DefenseCounts:
    check_batch(images, labels, allow_uint8=True)
    _check_positive("batch_size", batch_size)
    indices = _check_indices(indices, len(images))
    count = len(images) if limit is None else min(limit, len(images))
    if limit is not None:
        _check_positive("limit", limit)
    device = torch.device(device) if device is not None else _model_device(target)
    evaluated = defended = 0
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        x = _as_float(images[start:stop].to(device))
        y = labels[start:stop].cpu()
        clean_ok = predict(target, x, batch_size=batch_size, device=device) == y
        perturbed_ok = predict(target, perturb(x, indices[start:stop]), batch_size=batch_size, device=device) == y
        evaluated += int(clean_ok.sum())
        defended += int((clean_ok & perturbed_ok).sum())
    return DefenseCounts(n_crafted=count, n_fooled_source=None, n_evaluated=evaluated, n_defended=defended)


def noise(
    target: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigma_255: float,
    *,
    limit: int | None = None,
    seed: int = 0,
    indices: torch.Tensor | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> DefenseCounts:
    """Gaussian-noise protocol (Sec. 3.1.2) on the first ``limit`` images (default all).

    Images (N, C, H, W) uint8 or floats in [0, 1], labels (N,). See the module docstring
    for what the counts mean; noise as in ``gaussian_noise``.
    """
    _check_sigma(sigma_255)
    return _perturbation_counts(target, images, labels, perturbation(Protocol.NOISE, sigma_255, seed=seed), limit,
                                indices, batch_size, device)


def patch_shuffle(
    target: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    *,
    limit: int | None = None,
    seed: int = 0,
    indices: torch.Tensor | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> DefenseCounts:
    """Patch-shuffle protocol (Sec. 3.2, n x n patches permuted; the paper's n: 2, 4, 8).

    Images (N, C, H, W) uint8 or floats in [0, 1], labels (N,). See the module docstring
    for what the counts mean; shuffling as in ``shuffle_patches``.
    """
    check_batch(images, labels, allow_uint8=True)
    _check_grid(n, images.shape[2], images.shape[3])
    return _perturbation_counts(target, images, labels, perturbation(Protocol.SHUFFLE, n, seed=seed), limit,
                                indices, batch_size, device)
