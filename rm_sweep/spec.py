"""What determines a trained model (``ModelSpec``) or a five-mask ensemble (``EnsembleSpec``), and their ids.

    spec = ModelSpec("resnet18", data_identity("folder:../shared/data/cifar10-jpeg"), width=0.25,
                     mask=MaskConfig(shallow_ratio=0.7), train_subset=5000, recipe="quick")
    spec.model_id   # '3f1c...' (16 hex digits): the same on every machine for the same spec

A spec is a value: two specs that train the same model are equal and share a ``model_id``, which
is how the sweep skips models the store already holds. To make that true, ``__post_init__``
canonicalises what cannot change the trained model: numbers get one type (``1`` and ``1.0`` are
one width), an unmasked network has mask seed 0, variant ``random`` and channel multiplier 1 (none
of which touch a network without masks), a ``channel`` (DC) network, which is narrower instead of
masked, has mask seed 0, and recipe overrides equal to the named recipe's own values are dropped.
"""
from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rm_sweep import checks
from rm_sweep.errors import UserError
from rm_sweep.masks import MaskConfig
from rm_sweep.models import Classifier, check_arch, create_model, model_revision
from rm_sweep.recipes import Recipe, canonical_overrides, get_recipe

if TYPE_CHECKING:
    from rm_sweep.data import Dataset

ID_LENGTH = 16  # hex digits of sha256: 64 bits, no collision in any realistic store
COMBINE = ("mean_logits",)
DATA_KINDS = ("cifar10", "mnist", "folder")
# How subsets are chosen and test images ordered (``rm_sweep.data``): part of every model id, so a
# change there never lets a store serve models or attack sets made under the old scheme.
DATA_SCHEME = "subsets:balanced-per-class,seed-0;folder-test-order:class-interleaved,seed-0"


# -- data sets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """A data set's name: ``kind`` in ``DATA_KINDS``; ``path`` only for ``folder``."""

    kind: str
    path: str | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"

    @property
    def augment(self) -> str:
        """The paper's augmentation for this data set."""
        return "flip" if self.kind == "mnist" else "crop-flip"


def parse_data_spec(text: str | DataSpec) -> DataSpec:
    """``"cifar10"``, ``"mnist"`` or ``"folder:PATH"`` -> ``DataSpec``; anything else is a ``UserError``."""
    if isinstance(text, DataSpec):
        return text
    kind, sep, path = text.strip().partition(":")
    if kind == "folder":
        if not path:
            raise UserError("data spec 'folder:' needs a path, e.g. folder:../shared/data/cifar10-jpeg")
        return DataSpec("folder", path)
    if kind in DATA_KINDS and not sep:
        return DataSpec(kind)
    raise UserError(f"unknown data set {text!r}; use cifar10, mnist or folder:PATH")


def data_identity(text: str) -> str:
    """The data set's name as model ids see it: ``cifar10``, ``mnist`` or ``folder:NAME``.

    A folder is named by its own directory name, not by its path, so the same data set at
    ``../shared/data/cifar10-jpeg`` on a laptop and ``/mnt/data/cifar10-jpeg`` on a cluster gives
    the same model ids. Two different folders with the same name would share ids: give data
    folders distinct names (a version suffix, say).
    """
    spec = parse_data_spec(text)
    if spec.path is None:
        return spec.kind
    try:
        name = Path(spec.path).expanduser().resolve().name
    except (RuntimeError, ValueError) as exc:  # ~nosuchuser; a NUL byte
        raise UserError(f"data spec {text!r}: {exc}") from None
    if not name:
        raise UserError(f"data spec {text!r}: the folder needs a name (the root directory cannot be a data set)")
    return f"folder:{name}"


# -- ids -------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def short_hash(obj: Any) -> str:
    """First ``ID_LENGTH`` hex digits of sha256 of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:ID_LENGTH]


# -- labels ----------------------------------------------------------------------------------------
ARCH_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "densenet121": "DenseNet-121",
              "senet18": "SENet-18", "vgg19": "VGG-19"}
VARIANT_TAGS = {"same": "SM", "channel": "DC"}  # the paper's names for the mask variants


def paper_label(arch: str, shallow_ratio: float, deep_ratio: float, variant: str, channel_multiplier: float,
                *, ensemble: bool = False) -> str:
    """The paper's name for a model: ``Normal ResNet-18``, ``ResNet-18 0.7-Shallow``,
    ``ResNet-18 0.5-Shallow, 0.5-Deep SM``, ``... DC``, ``... x2``, ``... EN`` (an ensemble)."""
    name = ARCH_NAMES.get(arch, arch)
    parts = [f"{r:g}-{part}" for r, part in ((shallow_ratio, "Shallow"), (deep_ratio, "Deep")) if r]
    if not parts:
        label = f"Normal {name}"
    else:
        label = f"{name} {', '.join(parts)}"
        label += f" {VARIANT_TAGS[variant]}" if variant in VARIANT_TAGS else ""
        label += f" x{channel_multiplier:g}" if channel_multiplier != 1 else ""
    return label + (" EN" if ensemble else "")


# -- models ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines one trained model; ``model_id`` is its 16-hex-digit hash.

    Attributes:
        arch: a name from ``rm_sweep.models.list_models()``.
        data: the data set's identity (``data_identity``): ``cifar10``, ``mnist``, ``folder:NAME``.
            The location it is loaded from is not part of the spec (see ``data_identity``).
        width: channel width factor of the whole network (> 0).
        mask: where and how the network is masked, including the mask seed.
        train_subset, test_subset: images kept per split (balanced per class, chosen with seed 0
            so every model of a sweep sees the same images); None for the whole split.
        recipe: a name from ``rm_sweep.recipes.RECIPES``.
        recipe_overrides: (field, value) pairs replacing the recipe's fields; a mapping is accepted.
        seed: the training seed (weight initialisation, data order, augmentation).

    Input size, class count, channels and normalisation come from the data set when the model is
    built (``create``): they follow from ``data`` and need no field of their own.
    """

    arch: str
    data: str
    width: float = 1.0
    mask: MaskConfig = field(default_factory=MaskConfig)
    train_subset: int | None = None
    test_subset: int | None = None
    recipe: str = "paper"
    recipe_overrides: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        check_arch(self.arch)
        if not isinstance(self.mask, MaskConfig):
            raise UserError(f"mask must be a MaskConfig, got {type(self.mask).__name__}")
        canonical = {
            "data": data_identity(self.data),
            "width": float(checks.positive(self.width, "width")),
            "train_subset": _subset(self.train_subset, "train_subset"),
            "test_subset": _subset(self.test_subset, "test_subset"),
            "mask": _canonical_mask(self.mask),
            "recipe_overrides": canonical_overrides(self.recipe, dict(self.recipe_overrides)),
            "seed": checks.seed(self.seed),
        }
        for name, value in canonical.items():
            object.__setattr__(self, name, value)  # a frozen dataclass sets its own fields only here

    @functools.cached_property
    def model_id(self) -> str:
        """16 hex digits of sha256 of the canonical JSON of ``to_dict()``.

        The dict holds the architecture's revision and the data scheme, so when a definition
        changes (a network's layers, how subsets are chosen), every id made under the old one
        stops matching and a store never serves such a model as the new one.
        """
        return short_hash(self.to_dict())

    @property
    def label(self) -> str:
        """The paper's name with what tells it apart, e.g. ``ResNet-18 0.9-Shallow (width 0.25, seed 1)``."""
        m = self.mask
        details = [f"width {self.width:g}"] if self.width != 1 else []
        details += [f"seed {self.seed}"] + ([f"mask seed {m.seed}"] if m.seed else [])
        label = paper_label(self.arch, m.shallow_ratio, m.deep_ratio, m.variant, m.channel_multiplier)
        return f"{label} ({', '.join(details)})"

    def recipe_config(self) -> Recipe:
        """The resolved training recipe (named recipe with the overrides applied)."""
        return get_recipe(self.recipe, **dict(self.recipe_overrides))

    def create(self, data: Dataset) -> Classifier:
        """The untrained network for ``data`` (its size, classes and statistics), initialised
        under ``seed`` and masked under ``mask.seed``."""
        torch.manual_seed(self.seed)
        return create_model(self.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                            image_size=data.image_size, mask=self.mask, width=self.width,
                            mean=data.mean, std=data.std)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict`` inverts it. ``revision`` and ``data_scheme`` are
        the current code's, not fields: they identify the definitions the model is built with."""
        return {
            "arch": self.arch,
            "revision": model_revision(self.arch),
            "data_scheme": DATA_SCHEME,
            "data": self.data,
            "width": self.width,
            "mask": self.mask.to_dict(),
            "train_subset": self.train_subset,
            "test_subset": self.test_subset,
            "recipe": self.recipe,
            "recipe_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in self.recipe_overrides},
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """The spec ``to_dict`` wrote; a ``UserError`` if it was written under other definitions."""
        d = dict(d)
        written = {"revision": d.pop("revision", None), "data_scheme": d.pop("data_scheme", None)}
        checks.known_fields(d, [f.name for f in fields(cls)], "model spec")
        spec = cls(**{**d, "mask": MaskConfig.from_dict(d.get("mask", {}))})
        current = {"revision": model_revision(spec.arch), "data_scheme": DATA_SCHEME}
        if written != current:
            differ = ", ".join(f"{k} {written[k]!r} (this version: {current[k]!r})" for k in current
                               if written[k] != current[k])
            raise UserError(f"model spec of {spec.arch} was written under other definitions: {differ}; "
                            "this version cannot rebuild that model (retrain it)")
        return spec


def _subset(value: Any, what: str) -> int | None:
    return None if value is None else checks.positive_int(value, what)


def _canonical_mask(mask: MaskConfig) -> MaskConfig:
    shallow, deep = checks.ratio(mask.shallow_ratio, "shallow_ratio"), checks.ratio(mask.deep_ratio, "deep_ratio")
    if shallow == 0 and deep == 0:
        # No layer is masked: seed, variant and multiplier leave the network untouched.
        return MaskConfig()
    # A "channel" (DC) network is narrower and has no masks: its mask seed changes nothing.
    seed = 0 if mask.variant == "channel" else checks.seed(mask.seed, "mask seed")
    return MaskConfig(shallow, deep, mask.variant, float(checks.positive(mask.channel_multiplier, "channel_multiplier")),
                      seed)


@dataclass(frozen=True)
class EnsembleSpec:
    """Models combined by averaging their logits (the paper's "EN": five masks, one setting).

    ``ensemble_id`` hashes the sorted member ids and ``combine``, so member order does not matter.
    """

    members: tuple[ModelSpec, ...]
    combine: str = "mean_logits"

    def __post_init__(self) -> None:
        members = tuple(self.members)
        if len(members) < 2:
            raise UserError(f"an ensemble needs at least 2 members, got {len(members)}")
        if len({m.model_id for m in members}) != len(members):
            raise UserError("ensemble members must be different models")
        checks.choice(self.combine, COMBINE, "ensemble combination")
        object.__setattr__(self, "members", members)

    @property
    def label(self) -> str:
        """The paper's name of the ensemble, e.g. ``ResNet-18 0.5-Shallow EN``."""
        m = self.members[0]
        return paper_label(m.arch, m.mask.shallow_ratio, m.mask.deep_ratio, m.mask.variant,
                           m.mask.channel_multiplier, ensemble=True)

    @property
    def member_ids(self) -> list[str]:
        return sorted(m.model_id for m in self.members)

    @property
    def ensemble_id(self) -> str:
        return short_hash({"members": self.member_ids, "combine": self.combine})

    def to_dict(self) -> dict[str, Any]:
        return {"members": [m.to_dict() for m in self.members], "combine": self.combine}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnsembleSpec:
        return cls(tuple(ModelSpec.from_dict(m) for m in d["members"]), d.get("combine", "mean_logits"))


# -- the attack matrix -----------------------------------------------------------------------------
# A matrix cell is identified by these columns; a second row with the same values is the same fact.
MATRIX_KEY = ("protocol", "source_id", "target_id", "attack", "attack_params", "limit")


def matrix_key(row: Mapping[str, Any]) -> tuple:
    """The identity of a matrix cell (``MATRIX_KEY`` values; a missing source is ``None``)."""
    return tuple(row.get(c) for c in MATRIX_KEY)


@dataclass(frozen=True)
class MatrixCell:
    """One fact of the attack matrix, keyed exactly as the store keys its ``matrix`` rows.

    Attributes:
        protocol: a name from ``rm_sweep.protocols.PROTOCOLS``.
        source_id: the model or ensemble the adversarial images are crafted on; None for the
            protocols without a source (noise, shuffle, query).
        target_id: the model or ensemble evaluated.
        target_kind: ``model`` or ``ensemble``.
        attack: the attack setting's name (``rm_sweep.attacks.SETTINGS``) or the protocol's.
        attack_params: canonical JSON of what the cell's images depend on: the setting's
            ``params()``, ``{"sigma_255": s}`` for noise, ``{"patches": n}`` for shuffle.
        limit: at most this many test images are used.
    """

    protocol: str
    source_id: str | None
    target_id: str
    target_kind: str
    attack: str
    attack_params: str
    limit: int

    def key(self) -> tuple:
        """The store's ``matrix_key`` of this cell."""
        return matrix_key(asdict(self))


__all__ = ["ARCH_NAMES", "COMBINE", "DATA_KINDS", "DATA_SCHEME", "DataSpec", "EnsembleSpec", "ID_LENGTH", "MATRIX_KEY",
           "MatrixCell", "ModelSpec", "canonical_json", "data_identity", "matrix_key", "paper_label",
           "parse_data_spec", "short_hash"]
