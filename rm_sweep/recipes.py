"""Training recipes: how a model is trained, as values (no torch), named as the paper's.

    get_recipe("paper")               # SGD 0.9, wd 5e-4, batch 128, lr 0.1, 350 epochs, /10 at 150, 250
    get_recipe("paper", epochs=35)    # milestones keep their fractions: /10 at 15 and 25

``rm_sweep.train.fit`` runs a ``Recipe``; search spaces and model specs name one with overrides.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from rm_sweep import checks
from rm_sweep.errors import UserError

# The paper's augmentation: CIFAR-10 gets pad-4 random crop + horizontal flip, MNIST flip only.
AUGMENTATIONS = ("crop-flip", "flip", "none")
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: SGD(momentum, weight_decay, nesterov=False) and a MultiStepLR.

    ``milestones`` are the epochs after which the learning rate is multiplied by ``gamma``.
    ``augment`` is one of ``AUGMENTATIONS`` or ``auto`` (the data set's own: crop+flip for
    CIFAR-10 and folders, flip for MNIST, as in the paper).
    """

    name: str
    epochs: int
    lr: float
    milestones: tuple[int, ...]
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: str = "auto"

    def __post_init__(self) -> None:
        checks.positive_int(self.epochs, "epochs")
        # The optimiser's scalars meet float32 tensors: a larger one cannot be converted.
        checks.positive(self.lr, "lr", maximum=FLOAT32_MAX)
        checks.positive(self.batch_size, "batch_size (BatchNorm needs 2 images)", integer=True, minimum=2,
                        strict=False)
        for name in ("gamma", "momentum", "weight_decay"):
            checks.positive(getattr(self, name), name, strict=False, maximum=FLOAT32_MAX)
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise UserError(f"milestones must be increasing positive epochs, got {list(self.milestones)}")
        if self.augment not in ("auto", *AUGMENTATIONS):
            raise UserError(f"unknown augmentation {self.augment!r}; choose auto, {', '.join(AUGMENTATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


RECIPES: dict[str, Recipe] = {
    # The paper's CIFAR-10 schedule (Sec. D of the appendix and the authors' code).
    "paper": Recipe("paper", epochs=350, lr=0.1, milestones=(150, 250)),
    # The paper's MNIST schedule; augmentation "auto" gives MNIST its flip-only augmentation.
    "paper-mnist": Recipe("paper-mnist", epochs=50, lr=0.1, milestones=(20, 40)),
    # A CPU-sized run: ResNet-18 at width 0.25 on 5,000 images reached 51 % on 1,000 test images
    # in 11 CPU-minutes (2 threads). Few epochs need many steps, hence batch 64; lr 0.05 is stable
    # without warm-up for BatchNorm ResNets at that batch size; two /10 steps (after 60 % and 80 %
    # of training) end it in a low-lr phase, which is what lifts test accuracy in short runs.
    "quick": Recipe("quick", epochs=10, lr=0.05, milestones=(6, 8), batch_size=64),
}
OVERRIDABLE = tuple(f.name for f in fields(Recipe) if f.name != "name")


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """A named recipe with fields replaced by ``overrides`` (``None`` values are ignored).

    Overriding ``epochs`` without ``milestones`` moves the milestones to the same fractions of
    the new length, so ``get_recipe("paper", epochs=35)`` decays at epochs 15 and 25.
    """
    base = RECIPES[checks.choice(name, RECIPES, "recipe")]
    overrides = dict(checks.known_fields({k: v for k, v in overrides.items() if v is not None}, OVERRIDABLE,
                                         "recipe"))
    if "epochs" in overrides and "milestones" not in overrides:
        epochs = overrides["epochs"]
        if isinstance(epochs, int) and epochs >= 1:
            scaled = {round(m * epochs / base.epochs) for m in base.milestones}
            overrides["milestones"] = tuple(sorted(m for m in scaled if 1 <= m < epochs))
    if "milestones" in overrides:
        overrides["milestones"] = tuple(overrides["milestones"])
    return replace(base, **overrides)


def canonical_overrides(recipe: str, overrides: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Sorted (field, value) pairs, typed like ``Recipe``'s fields, without values equal to the
    named recipe's (so ``{epochs: 350}`` on ``paper`` is no override at all): two ways of writing
    one recipe give one model id."""
    base = RECIPES[checks.choice(recipe, RECIPES, "recipe")]
    checks.known_fields(overrides, OVERRIDABLE, "recipe")
    out: dict[str, Any] = {}
    for key in sorted(overrides):
        value, default = overrides[key], getattr(base, key)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise UserError(f"recipe.{key} must be a list, got {value!r}")
            value = tuple(checks.number(v, f"recipe.{key}", integer=True) for v in value)
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            value = checks.number(value, f"recipe.{key}", integer=isinstance(default, int))
        if value != default:
            out[key] = value
    if "milestones" in out:
        # Overriding epochs alone moves the milestones; naming the moved ones is the same recipe.
        others = {k: v for k, v in out.items() if k != "milestones"}
        if get_recipe(recipe, **others).milestones == out["milestones"]:
            del out["milestones"]
    get_recipe(recipe, **out)  # validates the combination (epochs >= 1, milestones in order, ...)
    return tuple(out.items())


__all__ = ["AUGMENTATIONS", "OVERRIDABLE", "RECIPES", "Recipe", "canonical_overrides", "get_recipe"]
