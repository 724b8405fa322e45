"""Every change to an architecture's definition bumps its revision (``register_model``), so that
models stored under an older definition are never taken for the new one.

The fingerprint hashes what a definition builds over a few configs: module types and geometry,
parameter and buffer names and shapes, and each RandomMask's name and mask shape. It cannot see
a reordering inside ``forward``: bump the revision for such a change by hand.
"""
from __future__ import annotations

import hashlib

import pytest
from torch import nn

from rm_sweep.errors import UserError
from rm_sweep.masks import MaskConfig, RandomMask
from rm_sweep.models import create_model, list_models, model_revision

CONFIGS = {
    "unmasked": None,
    "shallow 0.5 random": MaskConfig(0.5),
    "shallow 0.5 channel": MaskConfig(0.5, variant="channel"),
    "shallow 0.5 x2": MaskConfig(0.5, channel_multiplier=2),
    "deep 0.5": MaskConfig(deep_ratio=0.5),
}
# Module attributes that change what a layer computes without changing any shape.
GEOMETRY = ("kernel_size", "stride", "padding", "dilation", "groups", "ceil_mode", "eps", "ratio", "variant")

# {arch: (revision, fingerprint)}: update both together, with the revision bumped.
REVISIONS = {
    "densenet121": (2, "e953b7ec40f6115b"),
    "resnet18": (2, "a1730d9610f104a9"),
    "resnet50": (2, "ac5f25fc8ebef39c"),
    "senet18": (2, "de746636c37acee5"),
    "vgg19": (3, "d46e6e4c35e21365"),
}


def _describe(model: nn.Module) -> list[str]:
    lines = []
    for name, m in model.named_modules():
        attrs = {a: getattr(m, a) for a in GEOMETRY if hasattr(m, a)}
        lines.append(f"module {name} {type(m).__name__} {attrs}")
        if isinstance(m, RandomMask):
            lines.append(f"mask {name} {tuple(m.mask.shape)}")
    lines += [f"parameter {n} {tuple(p.shape)}" for n, p in model.named_parameters()]
    lines += [f"buffer {n} {tuple(b.shape)}" for n, b in model.named_buffers()]
    return lines


def fingerprint(arch: str) -> str:
    digest = hashlib.sha256()
    for label, mask in CONFIGS.items():
        digest.update(f"config {label}\n".encode())
        digest.update("\n".join(_describe(create_model(arch, mask=mask))).encode())
    return digest.hexdigest()[:16]


def test_every_architecture_has_a_revision_entry():
    assert sorted(REVISIONS) == list_models()


def test_revision_of_an_unknown_architecture_raises_naming_it():
    with pytest.raises(UserError, match="unknown architecture 'resnet19'"):
        model_revision("resnet19")


@pytest.mark.parametrize("arch", list_models())
def test_definition_changes_come_with_a_new_revision(arch):
    stored_revision, stored_fingerprint = REVISIONS[arch]
    revision, now = model_revision(arch), fingerprint(arch)
    if now != stored_fingerprint:
        assert revision > stored_revision, (
            f"{arch}'s definition changed (fingerprint {now}, was {stored_fingerprint}): bump its revision "
            f"in register_model to {stored_revision + 1} and set REVISIONS[{arch!r}] = "
            f"({stored_revision + 1}, {now!r}) in tests/test_model_revisions.py")
    assert (revision, now) == (stored_revision, stored_fingerprint), (
        f"{arch} is at revision {revision}: set REVISIONS[{arch!r}] = ({revision}, {now!r}) "
        "in tests/test_model_revisions.py")
