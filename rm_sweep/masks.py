"""Random Mask: fixed binary masks on feature maps, chosen before training (the paper's Sec. 2).

A masked layer computes ``relu(mask * bn(conv(x)))``: the mask zeroes a fixed set of neurons
of the BatchNorm output, so the following layers always see zeros there, in training and at
test time alike. Masks are buffers, so they travel with the ``state_dict``. The paper's "DC"
(``channel``) is no mask at all but a narrower network: ``LayerPlan.channels`` builds it.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rm_sweep import checks
from rm_sweep.errors import UserError

VARIANTS = ("random", "same", "channel")
PARTS = ("shallow", "deep")


@dataclass(frozen=True)
class MaskConfig:
    """Where and how a network is masked.

    Attributes:
        shallow_ratio: drop ratio p in the shallow blocks (ResNet-18: stem, layer1, layer2).
        deep_ratio: drop ratio in the deep blocks (ResNet-18: layer3, layer4).
        variant: ``random`` (independent positions per channel, the paper's Random Mask),
            ``same`` (one spatial mask shared by all channels of a layer, the paper's "SM"),
            ``channel`` (the paper's "DC", App. F.5: no masks; every layer of a part with ratio
            p > 0 is ceil((1-p)*C) channels wide instead of C, as the authors'
            ``resnet_drop_012_dc05.py``/``_dc09.py``).
        channel_multiplier: channels of the masked blocks are multiplied by this (the paper's x2).
        seed: the mask seed; masks are a pure function of (seed, layer name).
    """

    shallow_ratio: float = 0.0
    deep_ratio: float = 0.0
    variant: str = "random"
    channel_multiplier: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for part in PARTS:
            checks.ratio(getattr(self, f"{part}_ratio"), f"{part}_ratio")
        checks.choice(self.variant, VARIANTS, "mask variant")
        checks.positive(self.channel_multiplier, "channel_multiplier")
        checks.seed(self.seed, "mask seed")

    def ratio(self, part: str) -> float:
        """Drop ratio of ``part`` ("shallow" or "deep")."""
        return self.shallow_ratio if part == "shallow" else self.deep_ratio

    def multiplier(self, part: str) -> float:
        """Channel factor of ``part``: the multiplier where the part is masked, else 1."""
        return self.channel_multiplier if self.ratio(part) > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskConfig:
        return cls(**checks.known_fields(d, cls.__dataclass_fields__, "mask"))


def _generator(seed: int, layer: str) -> torch.Generator:
    # A cryptographic hash of (seed, layer) gives every layer its own stream that does not
    # depend on construction order, so adding a layer elsewhere never changes this one's mask.
    digest = hashlib.sha256(f"{seed}/{layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_mask(shape: tuple[int, int, int], ratio: float, variant: str, seed: int, layer: str) -> torch.Tensor:
    """A fixed 0/1 mask for one layer.

    Args:
        shape: (C, H, W) of the layer's output.
        ratio: share of zeros, in [0, 1).
        variant: ``random`` or ``same`` (``channel`` builds no masks).
        seed, layer: the mask seed and the layer's stable name; together they fix the mask.

    Returns:
        float32 tensor (C, H, W) of 0s and 1s: ``random`` has exactly round(ratio*H*W) zeros in
        every channel, ``same`` one such spatial mask for all channels. A ``UserError`` where
        that is every unit; on a small map a small ratio may drop none (1x1 at ratio 0.5).
    """
    c, h, w = shape
    dropped = round(ratio * h * w)
    if dropped == h * w:  # a deep mask on the last maps of VGG-19: 2x2 at ratio 0.9, 1x1 (MNIST) at 0.7
        raise UserError(f"the mask of {layer} would drop every unit of its {h}x{w} maps "
                        f"(round({ratio:g} x {h * w}) = {dropped}): the network's output would not depend on its input")
    rows = c if variant == "random" else 1
    # argsort of i.i.d. uniforms is a uniform random permutation per row.
    order = torch.rand(rows, h * w, generator=_generator(seed, layer)).argsort(dim=1)
    zeros = order[:, :dropped]
    mask = torch.ones(c, h * w)
    mask.scatter_(1, zeros.expand(c, -1) if rows == 1 else zeros, 0.0)
    return mask.view(c, h, w)


class RandomMask(nn.Module):
    """Multiplies feature maps (N, C, H, W) by a fixed mask (C, H, W) held in buffer ``mask``.

    Created without a mask; ``install_masks`` sizes and samples it once the network is built
    (the spatial size of a layer is only known by running the network).
    """

    mask: torch.Tensor | None

    def __init__(self, ratio: float, variant: str) -> None:
        super().__init__()
        self.ratio = ratio
        self.variant = variant
        self.register_buffer("mask", None)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return x
        if torch.compiler.is_compiling():
            # Compiled, the multiply fuses into the neighbouring kernels; the eager path's cache
            # (Python state keyed on data pointers) would only break the graph.
            return x * self._laid_out_like(x)
        # In place: x is a fresh BatchNorm output that nothing else keeps (BatchNorm's backward
        # saves its input), so no copy of a large activation is made.
        return x.mul_(self._mask_like(x))

    def _laid_out_like(self, x: torch.Tensor) -> torch.Tensor:
        """The mask as (1, C, H, W) in x's dtype and memory layout.

        Matching x keeps a bf16 autocast region in bf16 and the multiply vectorised: a
        channels-last x times an NCHW mask reads the mask with a stride in the innermost loop
        (4x slower on CPU eager, and Inductor's fused kernels suffer the same way).
        """
        mask = self.mask.to(device=x.device, dtype=x.dtype).unsqueeze(0)
        return mask.contiguous(memory_format=torch.channels_last) if _channels_last(x) else mask

    def _mask_like(self, x: torch.Tensor) -> torch.Tensor:
        """``_laid_out_like(x)``, cached between calls: spares an eager GPU step two extra
        kernels per mask. The key holds the buffer's version, so a ``load_state_dict`` into it
        invalidates it."""
        key = (x.dtype, x.device, _channels_last(x), self.mask.data_ptr(), self.mask._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._laid_out_like(x))
        return self._cache[1]

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, variant={self.variant}"


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def mask_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """The (C, H, W) each ``RandomMask`` of ``model`` sees, keyed by module path.

    ``example``: one input batch (1, C, H, W) of the size the network will see; on the meta
    device (with a model built there) nothing is allocated.
    """
    shapes: dict[str, tuple[int, int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:])))
        for name, m in model.named_modules() if isinstance(m, RandomMask)
    ]
    was_training = model.training
    model.eval()  # no BatchNorm statistics are touched by this probe
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def install_masks(model: nn.Module, shapes: dict[str, tuple[int, int, int]], seed: int) -> None:
    """Sample the mask of every ``RandomMask`` in ``model`` from (seed, module path), on the CPU.

    Args:
        model: a network whose ``RandomMask`` modules have no mask yet.
        shapes: each masked layer's (C, H, W), as ``mask_shapes`` finds them.
        seed: the mask seed.
    """
    for name, m in model.named_modules():
        if isinstance(m, RandomMask):
            m.mask = sample_mask(shapes[name], m.ratio, m.variant, seed, name)
