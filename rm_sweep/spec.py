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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from rm_sweep.data import DATA_SCHEME, Dataset, parse_data_spec
from rm_sweep.errors import UserError
from rm_sweep.masks import MaskConfig
from rm_sweep.models import Classifier, create_model, list_models, model_revision
from rm_sweep.train import RECIPES, Recipe, get_recipe

ID_LENGTH = 16  # hex digits of sha256: 64 bits, no collision in any realistic store
COMBINE = ("mean_logits",)


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
    name = Path(spec.path).expanduser().resolve().name
    if not name:
        raise UserError(f"data spec {text!r}: the folder needs a name (the root directory cannot be a data set)")
    return f"folder:{name}"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def short_hash(obj: Any) -> str:
    """First ``ID_LENGTH`` hex digits of sha256 of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:ID_LENGTH]


def _number(value: Any, what: str, kind: type) -> Any:
    """``value`` as ``kind`` (int or float), rejecting bools, strings and non-integral ints."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise UserError(f"{what} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def canonical_recipe_overrides(recipe: str, overrides: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Sorted (field, value) pairs, typed like ``Recipe``'s fields, without values equal to the
    named recipe's (so ``{epochs: 350}`` on ``paper`` is no override at all)."""
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    base = RECIPES[recipe]
    known = {f.name for f in fields(Recipe)} - {"name"}
    out: dict[str, Any] = {}
    for key in sorted(overrides):
        if key not in known:
            raise UserError(f"unknown recipe field {key!r}; choose from {', '.join(sorted(known))}")
        value, default = overrides[key], getattr(base, key)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise UserError(f"recipe {key} must be a list, got {value!r}")
            value = tuple(_number(v, f"recipe {key}", int) for v in value)
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            value = _number(value, f"recipe {key}", type(default))
        if value != default:
            out[key] = value
    if "milestones" in out:
        # Overriding epochs alone moves the milestones; naming the moved ones is the same recipe.
        others = {k: v for k, v in out.items() if k != "milestones"}
        if get_recipe(recipe, **others).milestones == out["milestones"]:
            del out["milestones"]
    get_recipe(recipe, **out)  # validates the combination (epochs >= 1, milestones in order, ...)
    return tuple(out.items())


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
        recipe: a name from ``rm_sweep.train.RECIPES``.
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
        if self.arch not in list_models():
            raise UserError(f"unknown architecture {self.arch!r}; choose one of {', '.join(list_models())}")
        width = _number(self.width, "width", float)
        if not width > 0:
            raise UserError(f"width must be positive, got {self.width!r}")
        if not isinstance(self.mask, MaskConfig):
            raise UserError(f"mask must be a MaskConfig, got {type(self.mask).__name__}")
        canonical = {
            "data": data_identity(self.data),
            "width": width,
            "train_subset": _subset(self.train_subset, "train_subset"),
            "test_subset": _subset(self.test_subset, "test_subset"),
            "mask": _canonical_mask(self.mask),
            "recipe_overrides": canonical_recipe_overrides(self.recipe, dict(self.recipe_overrides)),
            "seed": _number(self.seed, "seed", int),
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
        """A short description for people, e.g. ``resnet18 w0.25 shallow0.9 seed1``."""
        m, parts = self.mask, [self.arch]
        if self.width != 1:
            parts.append(f"w{self.width:g}")
        parts += [f"{part}{m.ratio(part):g}" for part in ("shallow", "deep") if m.ratio(part)]
        if m.shallow_ratio or m.deep_ratio:
            parts += [{"same": "SM", "channel": "DC"}[m.variant]] if m.variant != "random" else []
            parts += [f"x{m.channel_multiplier:g}"] if m.channel_multiplier != 1 else []
            parts += [f"mask{m.seed}"] if m.seed else []
        return " ".join([*parts, f"seed{self.seed}"])

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
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        """The spec ``to_dict`` wrote; a ``UserError`` if it was written under other definitions."""
        d = dict(d)
        definitions = {"revision": d.pop("revision", None), "data_scheme": d.pop("data_scheme", None)}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown model spec field(s): {', '.join(sorted(unknown))}")
        d["mask"] = MaskConfig.from_dict(d.get("mask", {}))
        spec = cls(**d)
        current = {"revision": model_revision(spec.arch), "data_scheme": DATA_SCHEME}
        if definitions != current:
            differ = ", ".join(f"{k} {definitions[k]!r} (this version: {current[k]!r})" for k in current
                               if definitions[k] != current[k])
            raise UserError(f"model spec of {spec.arch} was written under other definitions: {differ}; "
                            "this version cannot rebuild that model (retrain it)")
        return spec


def _subset(value: Any, what: str) -> int | None:
    if value is None:
        return None
    value = _number(value, what, int)
    if value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def _canonical_mask(mask: MaskConfig) -> MaskConfig:
    shallow = _number(mask.shallow_ratio, "shallow_ratio", float)
    deep = _number(mask.deep_ratio, "deep_ratio", float)
    if shallow == 0 and deep == 0:
        # No layer is masked: seed, variant and multiplier leave the network untouched.
        return MaskConfig()
    # A "channel" (DC) network is narrower and has no masks: its mask seed changes nothing.
    seed = 0 if mask.variant == "channel" else _number(mask.seed, "mask seed", int)
    return MaskConfig(shallow, deep, mask.variant, _number(mask.channel_multiplier, "channel_multiplier", float), seed)


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
        if self.combine not in COMBINE:
            raise UserError(f"unknown ensemble combination {self.combine!r}; choose one of {', '.join(COMBINE)}")
        object.__setattr__(self, "members", members)

    @property
    def member_ids(self) -> list[str]:
        return sorted(m.model_id for m in self.members)

    @property
    def ensemble_id(self) -> str:
        return short_hash({"members": self.member_ids, "combine": self.combine})

    def to_dict(self) -> dict[str, Any]:
        return {"members": [m.to_dict() for m in self.members], "combine": self.combine}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EnsembleSpec":
        return cls(tuple(ModelSpec.from_dict(m) for m in d["members"]), d.get("combine", "mean_logits"))


__all__ = ["COMBINE", "EnsembleSpec", "ID_LENGTH", "ModelSpec", "canonical_json", "canonical_recipe_overrides", "data_identity",
           "short_hash"]
