"""Ensembles average their members' logits and can be attacked like one model."""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from rm_sweep.attacks import pgd
from rm_sweep.ensemble import Ensemble
from rm_sweep.errors import UserError


def _member(seed: int) -> nn.Module:
    """A small [0, 1]-input classifier with BatchNorm (so eval mode matters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    ).eval()


def _images(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("size", [1, 2, 5])
def test_ensemble_of_identical_members_predicts_like_the_member(size: int) -> None:
    member = _member(0)
    ensemble = Ensemble([copy.deepcopy(member) for _ in range(size)]).eval()
    images, _ = _images()
    with torch.no_grad():
        expected, got = member(images), ensemble(images)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_ensemble_logits_are_the_mean_of_the_members() -> None:
    members = [_member(seed) for seed in range(5)]
    images, _ = _images()
    with torch.no_grad():
        expected = torch.stack([m(images) for m in members]).mean(0)
        got = Ensemble(members).eval()(images)
    assert torch.allclose(got, expected, atol=1e-6)


def test_attacking_a_one_member_ensemble_is_attacking_the_member() -> None:
    member = _member(0)
    images, labels = _images()
    alone = pgd(member, images, labels, 8 / 255, 2 / 255, 5)
    wrapped = pgd(Ensemble([member]), images, labels, 8 / 255, 2 / 255, 5)
    assert torch.equal(alone, wrapped)


def _input_gradient(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    x = images.clone().requires_grad_()
    nn.functional.cross_entropy(model(x), labels).backward()
    return x.grad


def test_an_attack_on_an_ensemble_uses_every_member() -> None:
    members = [_member(seed) for seed in range(3)]
    images, labels = _images()
    # The attack's gradient is that of the members' mean logits: every member's gradient counts.

    def mean_of_members(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in members]).mean(0)

    assert torch.allclose(_input_gradient(Ensemble(members), images, labels),
                          _input_gradient(mean_of_members, images, labels), rtol=1e-4, atol=1e-9)
    on_ensemble = pgd(Ensemble(members), images, labels, 8 / 255, 2 / 255, 5)
    assert all(not torch.equal(on_ensemble, pgd(m, images, labels, 8 / 255, 2 / 255, 5)) for m in members)
    assert (on_ensemble - images).abs().max().item() <= 8 / 255 + 1e-6


def test_attack_restores_every_members_mode() -> None:
    members = [_member(seed).train() for seed in range(2)]
    members[1].eval()
    ensemble = Ensemble(members)
    images, labels = _images()
    pgd(ensemble, images, labels, 8 / 255, 2 / 255, 2)
    assert [m.training for m in members] == [True, False]


def test_an_empty_ensemble_is_a_user_error() -> None:
    with pytest.raises(UserError, match="at least one model"):
        Ensemble([])
