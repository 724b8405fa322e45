"""The attack matrix's protocols as registered units: which images a cell uses and how it counts.

A protocol names a cell's images and the one counting rule it applies
(``DefenseCounts.from_verdicts``: of its images the target classifies correctly when clean, those
it still classifies correctly attacked or perturbed):

- ``black``: adversarials crafted on a source model (``craft``) and scored on another model;
- ``gray``: the same, between separately trained networks of one architecture (App. F.4);
- ``white``: a model attacked through its own gradients; every attacked image counts and the
  defended ones are those the attack failed on (counting only kept adversarials would give 0);
- ``noise`` / ``shuffle``: the first ``limit`` test images with Gaussian noise or shuffled patches;
- ``query`` (beyond the paper): the target attacked directly through its outputs only (Square,
  HopSkipJump) on the first ``limit`` test images it classifies correctly, each within the
  setting's query budget; defended = not fooled within it.

Each unit says where its images come from (``source``: crafted on another model, on the target
itself, or none), which search-space block field lists its values (``values``), the cell those
values make (``cell``) and how a target is counted (``count``). The search-space parser, the
in-process functions below and the Ray actors all go through these units. Adding a protocol is a
new class with ``@register_protocol`` here (or in its own module imported here), plus its test.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rm_sweep import checks
from rm_sweep.attacks import SETTINGS, AttackSetting, check_batch
from rm_sweep.errors import UserError
from rm_sweep.evaluate import (
    AdversarialSet,
    DefenseCounts,
    Target,
    as_float,
    as_target,
    check_indices,
    defense,
    white_box,
)
from rm_sweep.perturbations import check_grid, check_sigma, gaussian_noise, shuffle_patches
from rm_sweep.spec import EnsembleSpec, ModelSpec

DEFAULT_LIMIT = 5000  # test images per cell when neither the block nor the attack setting says
PERTURBATION_SEED = 0  # noise and shuffle draws depend on (this seed, test-image position) only


@dataclass(frozen=True)
class Job:
    """What the cells run together share: the attack or perturbation (``attack``, ``params``:
    the cells' ``attack_params``), the image ``limit``, and for crafting protocols the crafted
    ``adversarial_set``."""

    attack: str
    params: Mapping[str, Any]
    limit: int
    adversarial_set: AdversarialSet | None = None

    def setting(self) -> AttackSetting:
        """The attack setting the cells name, rebuilt from their stored parameters."""
        return AttackSetting.from_params(self.attack, self.params, limit=self.limit)


class Protocol(ABC):
    """A protocol of the attack matrix (the store's ``protocol`` column).

    Attributes:
        name: the protocol's name.
        source: ``other`` (crafted on another model), ``self`` (on the target itself) or
            ``none`` (no source model).
        values: the search-space block field listing the protocol's values.
        defaults: its values when a block gives none (empty: the field is required).
    """

    name: ClassVar[str]
    source: ClassVar[str]
    values: ClassVar[str]
    defaults: ClassVar[tuple[Any, ...]] = ()

    @property
    def crafts(self) -> bool:
        """Whether its images are adversarials crafted on a source (``craft``)."""
        return self.source != "none"

    @abstractmethod
    def cell(self, value: Any, limit: int | None) -> tuple[str, dict[str, Any], int]:
        """(``attack`` column, ``attack_params``, limit) of the cells of ``value`` (validated)
        with the block's ``limit`` (None: the default)."""

    def check_pair(self, source: ModelSpec | EnsembleSpec, target: ModelSpec | EnsembleSpec) -> str | None:
        """Why ``source`` may not be attacked onto ``target`` under this protocol, or None."""
        return None

    @abstractmethod
    def count(self, target: Target | None, job: Job, images: torch.Tensor, labels: torch.Tensor) -> DefenseCounts:
        """The counts of ``target`` (None for ``self``: the job holds them) on ``job``; ``images``
        (N, C, H, W) uint8 and ``labels`` (N,) are the test images, in attack order."""


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    PROTOCOLS[cls.name] = cls()
    return cls


# -- adversarials crafted on a source ---------------------------------------------------------------
def _setting_cell(value: Any, limit: int | None, query: bool) -> tuple[str, dict[str, Any], int]:
    """The cell of a named attack setting: a query attack for the ``query`` protocol, a transfer
    attack for the crafting ones."""
    setting = SETTINGS[checks.choice(value, SETTINGS, "attack setting")]
    if setting.query != query:
        raise UserError(f"{value} is a {'query' if setting.query else 'transfer'} attack: list it in a block of "
                        f"protocol {'query' if setting.query else 'black, gray or white'}")
    return setting.name, setting.params(), limit or setting.limit


class _Crafted(Protocol):
    values = "attacks"

    def cell(self, value: Any, limit: int | None) -> tuple[str, dict[str, Any], int]:
        return _setting_cell(value, limit, query=False)


@register_protocol
class Black(_Crafted):
    name, source = "black", "other"

    def count(self, target: Target | None, job: Job, images: torch.Tensor, labels: torch.Tensor) -> DefenseCounts:
        return defense(target, job.adversarial_set)


@register_protocol
class Gray(Black):
    """Black-box counting between separately trained networks of one architecture: the
    attacker knows the structure, not the weights (another initialisation, or another mask)."""

    name = "gray"

    def check_pair(self, source: ModelSpec | EnsembleSpec, target: ModelSpec | EnsembleSpec) -> str | None:
        sources, targets = _members(source), _members(target)
        if {m.arch for m in sources} != {m.arch for m in targets}:
            return (f"gray-box pairs need one architecture: source {sources[0].arch} ({sources[0].model_id}) and "
                    f"target {targets[0].arch} ({targets[0].model_id}); use a black block for cross-architecture pairs")
        shared = {m.seed for m in sources} & {m.seed for m in targets}
        if shared:
            return (f"gray-box target {targets[0].model_id} shares training seed {min(shared)} with its source "
                    f"{sources[0].model_id}; the paper's gray-box targets are trained separately (another "
                    "initialisation, or another mask and initialisation): give the target group another seed")
        return None


def _members(unit: ModelSpec | EnsembleSpec) -> tuple[ModelSpec, ...]:
    return unit.members if isinstance(unit, EnsembleSpec) else (unit,)


@register_protocol
class White(_Crafted):
    name, source = "white", "self"

    def count(self, target: Target | None, job: Job, images: torch.Tensor, labels: torch.Tensor) -> DefenseCounts:
        return white_box(job.adversarial_set)


# -- perturbations of the first test images ---------------------------------------------------------
def perturbation_counts(target: nn.Module | Target, images: torch.Tensor, labels: torch.Tensor,
                        perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], limit: int | None = None,
                        indices: torch.Tensor | None = None, **kwargs: Any) -> DefenseCounts:
    """Counts of ``target`` on the first ``limit`` (default all) of ``images`` after ``perturb``
    (a function of a float batch in [0, 1] and its (B,) test-set ``indices``; default 0..N-1)."""
    check_batch(images, labels, allow_uint8=True)
    target = as_target(target, **kwargs)
    indices = check_indices(indices, len(images))
    count = len(images) if limit is None else min(checks.positive_int(limit, "limit"), len(images))
    positions = torch.arange(count)
    perturbed = [perturb(as_float(images[b].to(target.device)), indices[b]).cpu()
                 for b in positions.split(target.batch_size)]
    perturbed_images = torch.cat(perturbed) if perturbed else images[:0].float()
    return DefenseCounts.from_verdicts(target.clean_correct(indices[:count], images[:count], labels[:count]),
                                       target.correct(perturbed_images, labels[:count]), n_crafted=count,
                                       n_fooled_source=None)


@register_protocol
class Noise(Protocol):
    """Gaussian noise of sigma/255, clipped to +-2 sigma (Sec. 3.1.2)."""

    name, source, values = "noise", "none", "sigmas"
    defaults = (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)  # the paper's levels

    def cell(self, value: Any, limit: int | None) -> tuple[str, dict[str, Any], int]:
        return self.name, {"sigma_255": check_sigma(value)}, limit or DEFAULT_LIMIT

    def count(self, target: Target | None, job: Job, images: torch.Tensor, labels: torch.Tensor) -> DefenseCounts:
        return noise(target, images, labels, job.params["sigma_255"], limit=job.limit, seed=PERTURBATION_SEED)


@register_protocol
class Shuffle(Protocol):
    """Images cut into n x n patches, the patches permuted (App. A)."""

    name, source, values = "shuffle", "none", "patches"
    defaults = (2, 4, 8)  # the paper's grids

    def cell(self, value: Any, limit: int | None) -> tuple[str, dict[str, Any], int]:
        n = int(checks.positive(value, "patches per side", integer=True, minimum=2, strict=False, maximum=checks.INT64_MAX))
        return self.name, {"patches": n}, limit or DEFAULT_LIMIT

    def count(self, target: Target | None, job: Job, images: torch.Tensor, labels: torch.Tensor) -> DefenseCounts:
        return patch_shuffle(target, images, labels, job.params["patches"], limit=job.limit, seed=PERTURBATION_SEED)


@register_protocol
class Query(Protocol):
    """The target attacked through its outputs only, no source model (beyond the paper)."""

    name, source, values = "query", "none", "attacks"

    def cell(self, value: Any, limit: int | None) -> tuple[str, dict[str, Any], int]:
        return _setting_cell(value, limit, query=True)

    def count(self, target: Target | None, job: Job, images: torch.Tensor, labels: torch.Tensor) -> DefenseCounts:
        setting = job.setting()
        positions = target.first_correct(images, labels, job.limit)
        queries, success = [], []
        for batch in positions.split(target.batch_size):
            result = setting.method(target.model, as_float(images[batch].to(target.device)),
                                    labels[batch].to(target.device), seed=PERTURBATION_SEED, ids=batch,
                                    quantise=setting.quantise)
            queries.append(result.queries.cpu())
            success.append(result.success.cpu())
        queries = torch.cat(queries) if queries else torch.zeros(0, dtype=torch.int64)
        success = torch.cat(success) if success else torch.zeros(0, dtype=torch.bool)
        target.passes += int(queries.sum())
        return DefenseCounts.from_queries(queries, success)


def noise(target: nn.Module | Target, images: torch.Tensor, labels: torch.Tensor, sigma_255: float, *,
          limit: int | None = None, seed: int = 0, indices: torch.Tensor | None = None, **kwargs: Any) -> DefenseCounts:
    """The ``noise`` protocol on the first ``limit`` images (default all): images (N, C, H, W)
    uint8 or floats in [0, 1], labels (N,); noise as ``gaussian_noise`` with ``seed``.
    ``kwargs`` (``batch_size``, ``device``) build the ``Target`` when a model is given."""
    check_sigma(sigma_255)
    return perturbation_counts(target, images, labels,
                               lambda x, i: gaussian_noise(x, sigma_255, seed=seed, indices=i), limit, indices, **kwargs)


def patch_shuffle(target: nn.Module | Target, images: torch.Tensor, labels: torch.Tensor, n: int, *,
                  limit: int | None = None, seed: int = 0, indices: torch.Tensor | None = None,
                  **kwargs: Any) -> DefenseCounts:
    """The ``shuffle`` protocol (n x n patches; the paper's n: 2, 4, 8), as ``noise``."""
    check_batch(images, labels, allow_uint8=True)
    check_grid(n, images.shape[2], images.shape[3])
    return perturbation_counts(target, images, labels,
                               lambda x, i: shuffle_patches(x, n, seed=seed, indices=i), limit, indices, **kwargs)


def protocol(name: str) -> Protocol:
    """The registered protocol ``name``."""
    return PROTOCOLS[checks.choice(name, PROTOCOLS, "protocol")]


__all__ = ["DEFAULT_LIMIT", "PERTURBATION_SEED", "PROTOCOLS", "Job", "Protocol", "noise", "patch_shuffle",
           "perturbation_counts", "protocol", "register_protocol"]
