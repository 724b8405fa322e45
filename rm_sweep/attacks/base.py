"""What every attack shares: the [0, 1] batch contract, eval mode, 8-bit rounding, input gradients,
and the registry that makes an attack a unit (``register_method``) and a setting a value
(``AttackSetting``: a registered attack with its parameters)."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rm_sweep import checks
from rm_sweep.errors import UserError


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters; restore every module's mode after.

    Freezing the parameters means backward passes compute input gradients only, which is
    all an attack needs (about a third of the work of a training step is saved).
    Each submodule's own ``training`` flag is restored, not just the top one's.
    """
    modes = [(module, module.training) for module in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for module, mode in modes:
            module.training = mode


def check_batch(images: torch.Tensor, labels: torch.Tensor, *, allow_uint8: bool = False) -> None:
    """Raise ``UserError`` unless images (N, C, H, W) are floats in [0, 1] and labels (N,) int64.

    With ``allow_uint8``, uint8 images (pixel values 0..255, read as k/255) pass too.
    """
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise UserError("images and labels must be torch tensors")
    if images.dim() != 4:
        raise UserError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    uint8 = allow_uint8 and images.dtype == torch.uint8
    if not (images.is_floating_point() or uint8):
        kind = "uint8 or floating point" if allow_uint8 else "floating point"
        raise UserError(f"images must be {kind} in [0, 1], got dtype {images.dtype}")
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise UserError(f"labels must be an int64 tensor of shape (N,), got {labels.dtype} {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise UserError(f"batch sizes differ: {len(images)} images but {len(labels)} labels")
    if images.device != labels.device:
        raise UserError(f"images are on {images.device} but labels on {labels.device}")
    if images.numel() and not uint8:
        low, high = torch.aminmax(images)
        # Written so that NaN fails too.
        if not (low.item() >= 0.0 and high.item() <= 1.0):
            raise UserError(f"images must lie in [0, 1], got values in [{low.item():g}, {high.item():g}]")


def round_to_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round images in [0, 1] to the nearest 8-bit level k/255 (the authors stored PNGs)."""
    return images.mul(255).round_().div_(255)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast of forward passes when asked for (fast on GPUs; gradients less exact)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def input_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, amp: bool) -> torch.Tensor:
    """Gradient of the summed cross-entropy loss with respect to the images ``x`` only.

    The sum (not the mean) keeps each image's gradient independent of the batch size.
    """
    x = x.detach().requires_grad_(True)
    with autocast(x.device, amp):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


# -- the registry -----------------------------------------------------------------------------------
METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Register an attack: a frozen dataclass of its parameters (budgets in /255 units) whose
    ``__call__(model, images, labels, *, amp=False)`` attacks a batch (N, C, H, W) in [0, 1] and
    returns adversarial images in [0, 1]. Query attacks (which see only a model's outputs) set
    ``query = True``, take ``__call__(model, images, labels, *, seed=0, ids=None, quantise=False)``
    (per-image seeds, rounding of their queries to 8 bits) and return a ``QueryResult``."""

    def deco(cls: type) -> type:
        cls.method = name
        METHODS[name] = cls
        return cls

    return deco


@dataclass(frozen=True)
class AttackSetting:
    """A named attack configuration: a registered attack with its parameters.

    Attributes:
        name: the key in ``SETTINGS``; the store's ``attack`` column.
        method: the attack's parameters, an instance of a registered class (e.g. ``PGD(8, 2, 7)``).
        quantise: round adversarial images to 8 bits (the authors saved them as PNGs).
        limit: how many correctly classified test images to attack by default
            (the paper: 5000; 1000 for CW).
        source: where in the paper (or the authors' code) the setting comes from.
    """

    name: str
    method: Any
    quantise: bool = True
    limit: int = 5000
    source: str = ""

    def __post_init__(self) -> None:
        if type(self.method) not in METHODS.values():
            raise UserError(f"attack setting {self.name!r}: {self.method!r} is not a registered attack")
        checks.positive_int(self.limit, "limit")

    @property
    def query(self) -> bool:
        """Whether the attack needs only the model's outputs (a query attack), not its gradients."""
        return getattr(self.method, "query", False)

    def params(self) -> dict[str, Any]:
        """What defines the attack, for store rows: the method's name and parameters (budgets in
        /255 units) and ``quantise``; ``limit`` and ``source`` are not part of the attack."""
        return {"method": self.method.method, **dataclasses.asdict(self.method), "quantise": self.quantise}

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any], **fields: Any) -> AttackSetting:
        """The setting ``params()`` describes (a stored cell keeps its meaning even if the named
        settings change)."""
        params = dict(params)
        method = checks.choice(params.pop("method", None), METHODS, "attack method")
        quantise = params.pop("quantise", True)
        known = [f.name for f in dataclasses.fields(METHODS[method])]
        checks.known_fields(params, known, f"attack setting {name}")
        return cls(name, METHODS[method](**params), quantise, **fields)

    def run(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, amp: bool = False) -> torch.Tensor:
        """Attack ``images`` (N, C, H, W) in [0, 1] with ``labels`` (N,); returns images in [0, 1]
        (on the 1/255 grid when ``quantise``). A query attack runs in float32 (``amp`` does not
        apply) with seed 0 and each image's position in the batch as its id, and its
        ``QueryResult.adversarial`` is returned (the query protocol reports its query counts)."""
        if self.query:
            return self.method(model, images, labels, quantise=self.quantise).adversarial
        adversarial = self.method(model, images, labels, amp=amp)
        return round_to_8bit(adversarial) if self.quantise else adversarial
