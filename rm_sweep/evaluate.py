"""The protocols' shared primitives: predictions, a target's verdicts, crafting, and counts.

- ``craft(source, ...)``: attack the first ``limit`` test images the source classifies
  correctly and keep the adversarials that fool it: an ``AdversarialSet`` with provenance,
  crafted once per (source, setting, limit) and reused for every target.
- ``Target``: a model under evaluation; its verdicts on clean test images are cached by
  test-set index, since every protocol asks about the same images.
- ``DefenseCounts.from_verdicts``: the one counting rule. Of the images a protocol uses, those
  the target classifies correctly when clean are evaluated (``n_evaluated``); of those, the ones
  it still classifies correctly attacked or perturbed are defended (``n_defended``).

How each protocol picks its images and applies that rule is ``rm_sweep.protocols``. Images go in
as (N, C, H, W) uint8 (read as k/255) or floats in [0, 1]; labels as (N,) int64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from rm_sweep import checks
from rm_sweep.attacks import AttackSetting, check_batch, frozen_eval, get_setting
from rm_sweep.errors import UserError


@dataclass(frozen=True)
class DefenseCounts:
    """Counts of one (source, target, attack, protocol) fact.

    Attributes:
        n_crafted: images attacked or perturbed.
        n_fooled_source: adversarials that fooled the source (None for the protocols without a
            source: noise, shuffle and query).
        n_evaluated: adversarials / perturbed images whose clean image the target classifies
            correctly (white-box: every attacked image).
        n_defended: of those, the ones the target still classifies correctly.
        median_queries: query attacks: the median queries to success of the images the attack
            fooled, the mean of the two middle counts when their number is even, as numpy's and
            DuckDB's median (None for other protocols; NaN when it fooled none).
    """

    n_crafted: int
    n_fooled_source: int | None
    n_evaluated: int
    n_defended: int
    median_queries: float | None = None

    @classmethod
    def from_verdicts(cls, clean_ok: torch.Tensor, attacked_ok: torch.Tensor, *, n_crafted: int,
                      n_fooled_source: int | None) -> DefenseCounts:
        """The counts from the target's verdicts, (M,) bool each: is the clean image classified
        correctly, is its adversarial or perturbed version. Only images the target gets right
        clean are evaluated."""
        return cls(n_crafted=n_crafted, n_fooled_source=n_fooled_source, n_evaluated=int(clean_ok.sum()),
                   n_defended=int((clean_ok & attacked_ok).sum()))

    @classmethod
    def from_queries(cls, queries: torch.Tensor, success: torch.Tensor) -> DefenseCounts:
        """A query attack's counts from its results on the images it attacked: ``queries`` (N,)
        int64 and ``success`` (N,) bool (``QueryResult``). It attacks only images the target
        gets right clean, so all N are evaluated; the ones it did not fool are defended."""
        fooled = queries[success].double()
        return cls(n_crafted=len(queries), n_fooled_source=None, n_evaluated=len(queries),
                   n_defended=int((~success).sum()),
                   median_queries=float(fooled.quantile(0.5)) if len(fooled) else math.nan)

    @property
    def defense_rate(self) -> float:
        """n_defended / n_evaluated; NaN when nothing was evaluated."""
        return self.n_defended / self.n_evaluated if self.n_evaluated else math.nan

    def as_dict(self) -> dict[str, Any]:
        """The counts and the rate (and a query attack's median queries), keyed as the store's
        matrix columns."""
        counts = {
            "n_crafted": self.n_crafted,
            "n_fooled_source": self.n_fooled_source,
            "n_evaluated": self.n_evaluated,
            "n_defended": self.n_defended,
            "defense_rate": self.defense_rate,
        }
        return counts if self.median_queries is None else {**counts, "median_queries": self.median_queries}


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


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (k) -> float32 k/255; floats unchanged."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def device_name(device: torch.device) -> str:
    """What a result records it ran on: the GPU's name (``NVIDIA H200``) or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def check_indices(indices: torch.Tensor | None, n: int) -> torch.Tensor:
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
    checks.positive_int(batch_size, "batch_size")
    device = torch.device(device) if device is not None else model_device(model)
    out = []
    with frozen_eval(model), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = as_float(images[start : start + batch_size].to(device, non_blocking=True))
            out.append(model(batch).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


class Target:
    """A model under evaluation, as the protocols see it.

    ``correct`` gives its verdicts on a batch (one forward pass per image, counted in
    ``passes``); ``clean_correct`` its verdicts on clean test images by test-set index, each
    computed once: crafted sets and perturbations are all cut from the same test images.

    Args:
        model: the target (a model or an ``Ensemble``), images (N, C, H, W) in [0, 1].
        batch_size: images per forward pass. device: where it runs (default: the model's).
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 512, device: torch.device | str | None = None) -> None:
        self.model = model
        self.batch_size = checks.positive_int(batch_size, "batch_size")
        self.device = torch.device(device) if device is not None else model_device(model)
        self.passes = 0
        self._clean = torch.zeros(0, dtype=torch.int8)  # per test index: -1 unknown, 0 wrong, 1 right

    def correct(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(M,) bool on the CPU: is each of ``images`` (M, C, H, W) classified as its label."""
        self.passes += len(images)
        return predict(self.model, images, batch_size=self.batch_size, device=self.device) == labels.cpu()

    def clean_correct(self, indices: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``correct(clean, labels)`` for the clean test images of test-set ``indices`` (M,),
        from the cache where known."""
        indices = indices.cpu()
        if len(indices) and int(indices.max()) >= len(self._clean):
            grown = torch.full((int(indices.max()) + 1,), -1, dtype=torch.int8)
            grown[: len(self._clean)] = self._clean
            self._clean = grown
        todo = (self._clean[indices] < 0).nonzero().flatten()
        if len(todo):
            self._clean[indices[todo]] = self.correct(clean[todo], labels[todo]).to(torch.int8)
        return self._clean[indices] == 1

    def first_correct(self, images: torch.Tensor, labels: torch.Tensor, limit: int) -> torch.Tensor:
        """Test-set positions (int64) of the first ``limit`` of ``images`` (N, C, H, W), the whole
        test set in order, that the model classifies correctly (stops early)."""
        found: list[torch.Tensor] = []
        count = 0
        for start in range(0, len(images), self.batch_size):
            positions = torch.arange(start, min(start + self.batch_size, len(images)))
            found.append(positions[self.clean_correct(positions, images[positions], labels[positions])])
            count += len(found[-1])
            if count >= limit:
                break
        return torch.cat(found)[:limit] if found else torch.zeros(0, dtype=torch.int64)


def as_target(model: nn.Module | Target, **kwargs: Any) -> Target:
    return model if isinstance(model, Target) else Target(model, **kwargs)


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
    setting = get_setting(setting) if isinstance(setting, str) else setting
    check_batch(images, labels, allow_uint8=True)
    limit = setting.limit if limit is None else limit
    checks.positive_int(limit, "limit")
    checks.positive_int(batch_size, "batch_size")
    indices = check_indices(indices, len(images))
    device = torch.device(device) if device is not None else model_device(source)
    chosen = Target(source, batch_size=batch_size, device=device).first_correct(images, labels, limit)
    kept: list[torch.Tensor] = []
    adversarials: list[torch.Tensor] = []
    starts = range(0, len(chosen), batch_size)
    for start in tqdm(starts, desc=f"craft {setting.name}", unit="batch", disable=not progress):
        positions = chosen[start : start + batch_size]
        x = as_float(images[positions].to(device))
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


def defense(target: nn.Module | Target, adversarial_set: AdversarialSet, **kwargs: Any) -> DefenseCounts:
    """The target's defense against a crafted set (black-box or gray-box): of the kept
    adversarials whose clean image it classifies correctly, those it still classifies correctly.
    ``kwargs`` (``batch_size``, ``device``) build the ``Target`` when a model is given."""
    target = as_target(target, **kwargs)
    s = adversarial_set
    return DefenseCounts.from_verdicts(target.clean_correct(s.indices, s.clean, s.labels),
                                       target.correct(s.adversarial, s.labels), n_crafted=s.n_crafted,
                                       n_fooled_source=s.n_fooled_source)


def white_box(adversarial_set: AdversarialSet) -> DefenseCounts:
    """White-box counts of the set's own source: of the ``n_crafted`` attacked images (all
    classified correctly clean), those the attack failed on are defended."""
    return DefenseCounts(
        n_crafted=adversarial_set.n_crafted,
        n_fooled_source=adversarial_set.n_fooled_source,
        n_evaluated=adversarial_set.n_crafted,
        n_defended=adversarial_set.n_crafted - adversarial_set.n_fooled_source,
    )


__all__ = ["AdversarialSet", "DefenseCounts", "Target", "as_float", "as_target", "check_indices", "craft", "defense",
           "device_name", "model_device", "predict", "white_box"]
