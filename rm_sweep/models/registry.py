"""Model configs, the architecture registry and ``create_model``."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rm_sweep import checks
from rm_sweep.errors import UserError
from rm_sweep.masks import PARTS, MaskConfig, RandomMask, install_masks, mask_shapes

# Per-channel statistics of the training images (CIFAR-10's std is the per-pixel one,
# not the 0.2023/0.1994/0.2010 copied through many CIFAR repositories).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network (its weights aside)."""

    arch: str
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    width: float = 1.0
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    mask: MaskConfig | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(checks.known_fields(d, cls.__dataclass_fields__, "model config"))
        mask = d.pop("mask", None)
        d["mean"], d["std"] = tuple(d.get("mean", ())), tuple(d.get("std", ()))
        return cls(**d, mask=None if mask is None else MaskConfig.from_dict(mask))


class Normalize(nn.Module):
    """First layer of every model: (x - mean) / std per channel; x (N, C, H, W) in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class LayerPlan:
    """What an architecture asks while it builds itself: how wide a layer is, and its mask.

    ``part`` is "shallow" or "deep"; ``width`` scales every layer, the mask's channel
    multiplier only the masked part. The ``channel`` variant (the paper's DC) masks nothing and
    narrows the masked part instead.
    """

    width: float
    mask: MaskConfig | None

    def channels(self, base: int, part: str) -> int:
        """Channels of a layer of ``part`` that has ``base`` channels in the plain network."""
        k = self.mask.multiplier(part) if self.mask else 1.0
        c = max(1, round(base * self.width * k))
        if not self._narrowed(part):
            return c
        # Rounded before the ceiling so float error cannot add a channel: (1 - 0.7) * 10 is
        # 3.0000000000000004 and must give 3, while (1 - 0.9) * 64 = 6.399999999999999 gives 7.
        return max(1, math.ceil(round((1 - self.mask.ratio(part)) * c, 9)))

    def resized(self, part: str) -> bool:
        """Whether ``part``'s layers are wider or narrower than the plain network's (x k or DC)."""
        return self.mask is not None and self.mask.ratio(part) > 0 and (
            self.mask.channel_multiplier != 1 or self.mask.variant == "channel")

    def masker(self, part: str) -> nn.Module:
        """A ``RandomMask`` where ``part`` is masked, otherwise the identity."""
        if self.mask is None or self.mask.ratio(part) == 0 or self._narrowed(part):
            return nn.Identity()
        return RandomMask(self.mask.ratio(part), self.mask.variant)

    def _narrowed(self, part: str) -> bool:
        return self.mask is not None and self.mask.variant == "channel" and self.mask.ratio(part) > 0


Builder = Callable[[LayerPlan, int, int], nn.Module]
_REGISTRY: dict[str, Builder] = {}
_REVISIONS: dict[str, int] = {}


def register_model(name: str, *, revision: int) -> Callable[[Builder], Builder]:
    """Register ``fn(plan, in_channels, num_classes) -> body`` under ``name``.

    ``revision`` numbers the architecture's definitions: bump it whenever a config would build
    a different network than before, so that models stored under an older definition are never
    taken for this one (tests/test_model_revisions.py fails until it is bumped).
    """

    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        _REVISIONS[name] = revision
        return fn

    return deco


def check_arch(name: str) -> str:
    """``name`` if it is a registered architecture; otherwise a ``UserError`` suggesting one."""
    return checks.choice(name, list_models(), "architecture")


def model_revision(name: str) -> int:
    """The revision of architecture ``name``'s definition (see ``register_model``)."""
    return _REVISIONS[check_arch(name)]


def list_models() -> list[str]:
    return sorted(_REGISTRY)


class Classifier(nn.Sequential):
    """``Normalize`` then the architecture's body; carries its ``ModelConfig`` as ``.config``.

    Input (N, C, H, W) in [0, 1]; output logits (N, num_classes).
    """

    def __init__(self, config: ModelConfig, body: nn.Module) -> None:
        super().__init__()
        self.normalize = Normalize(config.mean, config.std)
        self.body = body
        self.config = config


def build(config: ModelConfig) -> Classifier:
    """Build (and mask) the network a ``ModelConfig`` describes."""
    check_arch(config.arch)
    for what in ("num_classes", "in_channels", "image_size"):
        checks.positive_int(getattr(config, what), what)
    if len(config.mean) != config.in_channels or len(config.std) != config.in_channels:
        raise UserError(f"mean/std need {config.in_channels} values, one per input channel")
    checks.positive(config.width, "width")
    plan = LayerPlan(config.width, config.mask)
    shapes = _probe(config, plan)
    model = Classifier(config, _REGISTRY[config.arch](plan, config.in_channels, config.num_classes))
    if shapes is None:  # the meta device could not build or run it: one zero image, for real
        shapes = _shapes(model, config)
    if config.mask is not None:
        install_masks(model, shapes, config.mask.seed)
    return model


def _describe(config: ModelConfig) -> str:
    multiplier = config.mask.channel_multiplier if config.mask else 1.0
    return f"{config.arch} at width {config.width:g}" + (f", channel multiplier {multiplier:g}" if multiplier != 1 else "")


def _example(config: ModelConfig, device: str = "cpu") -> torch.Tensor:
    """One zero image (1, C, H, W) of the size ``config`` says the network will see."""
    return torch.zeros(1, config.in_channels, config.image_size, config.image_size, device=device)


def _shapes(model: Classifier, config: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """``mask_shapes`` for one image; a ``UserError`` where the network cannot take images of this size."""
    try:
        return mask_shapes(model, _example(config))
    except RuntimeError as exc:
        size = f"{config.image_size}x{config.image_size}"
        raise UserError(f"{_describe(config)} cannot take {size} images ({str(exc).splitlines()[0]})") from None


def _probe(config: ModelConfig, plan: LayerPlan) -> dict[str, tuple[int, int, int]] | None:
    """Build the network on the meta device, which allocates nothing, and run one image through
    it: the (C, H, W) each mask needs. None where the meta device cannot build or run this
    architecture (an op of its own) or the image is too small for it (``_shapes`` then says so).

    A ``UserError`` unless its weights, buffers and masks fit in the memory this machine has
    available, so that a width (or channel multiplier, or image size) typo fails in a second
    instead of filling memory until the kernel kills this process, or a neighbour's.
    """
    try:
        with torch.device("meta"):
            meta = Classifier(config, _REGISTRY[config.arch](plan, config.in_channels, config.num_classes))
    except (RuntimeError, NotImplementedError) as exc:
        if "overflow" not in str(exc):
            return None
        raise UserError(f"{_describe(config)} is too large to build ({str(exc).splitlines()[0]})") from None
    try:
        shapes = mask_shapes(meta, _example(config, "meta"))
    except (RuntimeError, NotImplementedError):  # too small an image, or an op meta lacks: tried for real
        return None
    state = sum(t.numel() * t.element_size() for t in meta.state_dict().values())
    masks = 4 * sum(math.prod(shape) for shape in shapes.values())  # float32, like every mask
    available = _memory_available()
    if available is not None and state + masks > available:
        parameters = sum(p.numel() for p in meta.parameters())
        raise UserError(f"{_describe(config)} has {parameters:,} parameters: {(state + masks) / 2**30:,.1f} GiB of "
                        f"weights, buffers and masks, and this machine has {available / 2**30:,.1f} GiB of memory "
                        "available")
    return shapes


def _memory_available() -> int | None:
    """Bytes of memory the kernel could give this process now (``MemAvailable``); None where
    ``/proc/meminfo`` does not say (not Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mask: MaskConfig | None = None,
    width: float = 1.0,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Classifier:
    """A zoo network that takes images (N, in_channels, image_size, image_size) in [0, 1].

    ``mean``/``std`` default to CIFAR-10's (3 channels) or MNIST's (1 channel).
    """
    if mean is None or std is None:
        if in_channels not in (1, 3):
            raise UserError(f"give mean and std for {in_channels}-channel inputs")
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if in_channels == 3 else (MNIST_MEAN, MNIST_STD)
    config = ModelConfig(name, num_classes, in_channels, image_size, float(width), tuple(mean), tuple(std), mask)
    return build(config)


__all__ = [
    "PARTS", "ModelConfig", "LayerPlan", "Classifier", "check_arch", "register_model", "model_revision", "list_models",
    "create_model", "build",
]
