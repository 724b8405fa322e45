"""The evaluation protocols count what the paper counts.

Most tests use ``Brightness``, a differentiable classifier whose every decision can be
worked out by hand: it predicts class k when an image's mean pixel value lies in
[k/10, (k+1)/10). FGSM moves every pixel of a constant image by eps towards the nearer
class boundary, so whether it fools the model is a matter of arithmetic.
"""
from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

from rm_sweep.attacks import get_setting
from rm_sweep.ensemble import Ensemble
from rm_sweep.errors import UserError
from rm_sweep.evaluate import AdversarialSet, DefenseCounts, craft, defense, predict, white_box
from rm_sweep.perturbations import gaussian_noise, shuffle_patches
from rm_sweep.protocols import noise, patch_shuffle


class Brightness(nn.Module):
    """logits_k = -scale * (mean(x) + shift - (k + 0.5) / 10)^2: class floor(10 * (mean + shift))."""

    def __init__(self, shift: float = 0.0, scale: float = 1000.0) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(shift))
        self.scale = scale
        self.register_buffer("centres", (torch.arange(10) + 0.5) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = x.mean((1, 2, 3))[:, None] + self.shift
        return -self.scale * (brightness - self.centres).square()


class TopLeft(nn.Module):
    """Classifies by the top-left patch only: sensitive to where patches are."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Brightness()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, :, : x.shape[2] // 2, : x.shape[3] // 2])


def constant_images(levels: list[int], size: int = 8) -> torch.Tensor:
    """uint8 images (N, 3, size, size), image i filled with levels[i]."""
    return torch.tensor(levels, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, size, size).clone()


# Pixel level -> brightness -> Brightness class; what madry_fgsm (eps 8/255) does to it:
#   64 -> 0.251 -> 2: boundaries 0.05 away, stays 2      74 -> 0.290 -> 2: +8 -> 0.322 -> 3, fooled
#   30 -> 0.118 -> 1 (label 5: misclassified, never attacked)
#  140 -> 0.549 -> 5: stays 5                            100 -> 0.392 -> 3: +8 -> 0.424 -> 4, fooled
#  200 -> 0.784 -> 7: +8 -> 0.816 -> 8, fooled
LEVELS = [64, 74, 30, 140, 100, 200]
LABELS = torch.tensor([2, 2, 5, 5, 3, 7])


def test_brightness_model_predicts_as_worked_out() -> None:
    assert predict(Brightness(), constant_images(LEVELS)).tolist() == [2, 2, 1, 5, 3, 7]


def test_craft_attacks_correct_images_and_keeps_those_that_fool_the_source() -> None:
    adversarial_set = craft(Brightness(), constant_images(LEVELS), LABELS, "madry_fgsm", source_id="bright")
    assert adversarial_set.n_crafted == 5  # all but image 2, which the source gets wrong
    assert adversarial_set.indices.tolist() == [1, 4, 5]
    assert adversarial_set.n_fooled_source == 3
    assert predict(Brightness(), adversarial_set.adversarial).tolist() == [3, 4, 8]
    assert torch.equal(adversarial_set.clean, constant_images([74, 100, 200]))
    assert torch.equal(adversarial_set.adversarial, constant_images([82, 108, 208]))


def test_craft_attacks_only_the_first_limit_correct_images() -> None:
    adversarial_set = craft(Brightness(), constant_images(LEVELS), LABELS, "madry_fgsm", limit=3, batch_size=2)
    assert adversarial_set.n_crafted == 3  # images 0, 1 and 3
    assert adversarial_set.indices.tolist() == [1]
    assert adversarial_set.limit == 3


def test_craft_records_provenance_with_test_set_indices() -> None:
    indices = torch.tensor([10, 11, 12, 13, 14, 15])
    setting = get_setting("madry_fgsm")
    adversarial_set = craft(Brightness(), constant_images(LEVELS), LABELS, setting, source_id="m1", indices=indices)
    assert (adversarial_set.source_id, adversarial_set.setting) == ("m1", "madry_fgsm")
    assert adversarial_set.params == setting.params()
    assert adversarial_set.indices.tolist() == [11, 14, 15]
    assert adversarial_set.labels.tolist() == [2, 3, 7]


@pytest.mark.parametrize(("quantise", "dtype"), [(True, torch.uint8), (False, torch.float32)])
def test_adversarial_sets_are_compact_plain_tensors_that_pickle(quantise: bool, dtype: torch.dtype) -> None:
    setting = get_setting("madry_pgd", quantise=quantise)
    adversarial_set = craft(Brightness(), constant_images(LEVELS), LABELS, setting)
    assert adversarial_set.adversarial.dtype == dtype and adversarial_set.clean.dtype == torch.uint8
    restored = pickle.loads(pickle.dumps(adversarial_set))
    assert torch.equal(restored.adversarial, adversarial_set.adversarial)
    assert restored.params == adversarial_set.params and restored.n_crafted == adversarial_set.n_crafted


def test_craft_on_float_images_keeps_float_clean_images() -> None:
    images = constant_images(LEVELS).float() / 255
    adversarial_set = craft(Brightness(), images, LABELS, "madry_fgsm")
    assert adversarial_set.clean.dtype == torch.float32
    assert adversarial_set.indices.tolist() == [1, 4, 5]


def test_an_ensemble_is_a_source_like_any_model() -> None:
    adversarial_set = craft(Ensemble([Brightness(), Brightness()]), constant_images(LEVELS), LABELS, "madry_fgsm")
    assert adversarial_set.indices.tolist() == [1, 4, 5]


def test_defense_counts_match_a_hand_computed_example() -> None:
    # clean:       64 -> 2 (label 2, right)   100 -> 3 (label 3, right)   200 -> 7 (label 5, wrong)  200 -> 7 (right)
    # adversarial: 70 -> 2 (still right)      120 -> 4 (now wrong)        not evaluated              190 -> 7 (right)
    adversarial_set = AdversarialSet(
        source_id="s", setting="madry_fgsm", params={}, limit=5000, n_crafted=10,
        indices=torch.arange(4), labels=torch.tensor([2, 3, 5, 7]),
        clean=constant_images([64, 100, 200, 200]), adversarial=constant_images([70, 120, 140, 190]),
    )
    counts = defense(Brightness(), adversarial_set)
    assert counts == DefenseCounts(n_crafted=10, n_fooled_source=4, n_evaluated=3, n_defended=2)
    assert counts.defense_rate == pytest.approx(2 / 3)
    assert counts.as_dict() == {"n_crafted": 10, "n_fooled_source": 4, "n_evaluated": 3, "n_defended": 2,
                                "defense_rate": pytest.approx(2 / 3)}


def test_black_box_target_that_sees_brighter_defends_differently() -> None:
    adversarial_set = craft(Brightness(), constant_images(LEVELS), LABELS, "madry_fgsm")
    # shift -0.03: clean 74 -> 0.260 -> 2, 100 -> 0.362 -> 3, 200 -> 0.754 -> 7 (all right);
    # adversarial 82 -> 0.292 -> 2 (defended), 108 -> 0.394 -> 3 (defended), 208 -> 0.786 -> 7 (defended)
    assert defense(Brightness(shift=-0.03), adversarial_set) == DefenseCounts(5, 3, 3, 3)
    # the source itself defends none of the adversarials that fooled it
    assert defense(Brightness(), adversarial_set) == DefenseCounts(5, 3, 3, 0)


def test_white_box_counts_every_attacked_image() -> None:
    adversarial_set = craft(Brightness(), constant_images(LEVELS), LABELS, "madry_fgsm")
    counts = white_box(adversarial_set)
    assert counts == DefenseCounts(n_crafted=5, n_fooled_source=3, n_evaluated=5, n_defended=2)
    assert counts.defense_rate == pytest.approx(0.4)


def test_defense_rate_of_nothing_evaluated_is_nan() -> None:
    assert math.isnan(DefenseCounts(0, 0, 0, 0).defense_rate)


# --- Gaussian noise ----------------------------------------------------------------------------


def _grey(n: int = 64, size: int = 16) -> torch.Tensor:
    return torch.full((n, 3, size, size), 0.5)


@pytest.mark.parametrize("sigma_255", [1, 8, 32])
def test_noise_is_clipped_to_two_sigma_and_the_image_to_unit_range(sigma_255: float) -> None:
    images = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noisy = gaussian_noise(images, sigma_255)
    assert (noisy - images).abs().max().item() <= 2 * sigma_255 / 255 + 1e-6
    assert noisy.min().item() >= 0.0 and noisy.max().item() <= 1.0


def test_noise_is_gaussian_with_its_tails_clipped() -> None:
    sigma = 4 / 255
    delta = gaussian_noise(_grey(), 4) - 0.5
    at_bound = ((delta.abs() - 2 * sigma).abs() < 1e-6).float().mean().item()
    assert at_bound == pytest.approx(0.0455, abs=0.006)  # P(|z| > 2) for a standard normal
    assert delta.std().item() == pytest.approx(0.96 * sigma, rel=0.03)  # std of a normal clipped at +-2 sigma


def test_noise_depends_on_seed_and_test_index_only() -> None:
    images, indices = _grey(8), torch.arange(100, 108)
    whole = gaussian_noise(images, 8, seed=3, indices=indices)
    parts = torch.cat([gaussian_noise(images[:3], 8, seed=3, indices=indices[:3]),
                       gaussian_noise(images[3:], 8, seed=3, indices=indices[3:])])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, gaussian_noise(images, 8, seed=4, indices=indices))
    assert not torch.equal(whole[0], whole[1])


def test_zero_noise_defends_every_correct_image() -> None:
    counts = noise(Brightness(), constant_images(LEVELS), LABELS, 0)
    assert counts == DefenseCounts(n_crafted=6, n_fooled_source=None, n_evaluated=5, n_defended=5)


def test_noise_counts_only_images_the_target_gets_right_when_clean() -> None:
    # 192 draws of sigma 32/255 move an 8x8x3 image's mean by about 0.009, far from any boundary
    counts = noise(Brightness(), constant_images([64, 30, 140]), torch.tensor([2, 5, 5]), 32, limit=2)
    assert counts == DefenseCounts(n_crafted=2, n_fooled_source=None, n_evaluated=1, n_defended=1)


# --- patch shuffle ------------------------------------------------------------------------------


def _numbered_patches(n: int, count: int = 5, patch: int = 2) -> torch.Tensor:
    """Images whose patch in row-major slot j is filled with the value j."""
    grid = torch.arange(n * n, dtype=torch.float32).view(n, n)
    image = grid.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    return image.expand(count, 3, -1, -1).clone()


@pytest.mark.parametrize("n", [2, 4, 8])
def test_shuffle_permutes_whole_patches(n: int) -> None:
    images = _numbered_patches(n)
    shuffled = shuffle_patches(images, n, seed=1)
    slots = shuffled[:, 0, ::2, ::2].reshape(len(images), -1)  # one value per patch slot
    patch_values = shuffled.unfold(2, 2, 2).unfold(3, 2, 2)
    assert (patch_values == patch_values[..., :1, :1]).all()  # every patch moved intact
    assert torch.equal(slots.sort(1).values, torch.arange(n * n).float().expand(len(images), -1))
    assert torch.equal(shuffled[:, 0], shuffled[:, 2])  # channels move together
    assert any(not torch.equal(slots[0], slots[i]) for i in range(1, len(images)))  # one permutation per image


def test_shuffle_with_one_patch_is_the_identity() -> None:
    images = torch.rand(3, 3, 8, 8)
    assert torch.equal(shuffle_patches(images, 1), images)


def test_shuffle_is_seeded_per_test_index() -> None:
    images = _numbered_patches(4)
    assert torch.equal(shuffle_patches(images, 4, seed=2), shuffle_patches(images, 4, seed=2))
    assert not torch.equal(shuffle_patches(images, 4, seed=2), shuffle_patches(images, 4, seed=3))
    assert torch.equal(shuffle_patches(images[2:], 4, indices=torch.arange(2, 5)), shuffle_patches(images, 4)[2:])


def test_shuffle_leaves_a_brightness_classifier_unmoved_but_not_a_position_sensitive_one() -> None:
    # half dark, half bright images: mean 0.475 -> class 4 under any shuffle; the top-left quarter decides TopLeft
    images = torch.zeros(40, 3, 8, 8)
    images[:, :, :, :4] = 0.95
    labels = torch.full((40,), 4)
    assert patch_shuffle(Brightness(), images, labels, 2) == DefenseCounts(40, None, 40, 40)
    top_left = patch_shuffle(TopLeft(), images, torch.full((40,), 9), 2)
    assert top_left.n_evaluated == 40 and 0 < top_left.n_defended < 40


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_setting_in_craft_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown attack setting 'fgsm8'"):
        craft(Brightness(), constant_images(LEVELS), LABELS, "fgsm8")


def test_mismatched_images_and_labels_are_a_user_error() -> None:
    with pytest.raises(UserError, match="batch sizes differ: 6 images but 5 labels"):
        craft(Brightness(), constant_images(LEVELS), LABELS[:5], "madry_fgsm")


def test_float_images_outside_unit_range_are_a_user_error() -> None:
    images = constant_images(LEVELS).float()  # forgot to divide by 255
    with pytest.raises(UserError, match=r"images must lie in \[0, 1\]"):
        noise(Brightness(), images, LABELS, 4)


@pytest.mark.parametrize(("n", "message"), [(3, "cannot be cut into 3x3"), (0, "must be a positive integer")])
def test_bad_patch_grids_are_user_errors(n: int, message: str) -> None:
    with pytest.raises(UserError, match=message):
        patch_shuffle(Brightness(), constant_images(LEVELS), LABELS, n)


@pytest.mark.parametrize("sigma", [-1, math.inf])
def test_bad_noise_sigma_is_a_user_error(sigma: float) -> None:
    with pytest.raises(UserError, match="noise sigma"):
        noise(Brightness(), constant_images(LEVELS), LABELS, sigma)


def test_non_positive_limit_is_a_user_error() -> None:
    with pytest.raises(UserError, match="limit must be a positive integer"):
        craft(Brightness(), constant_images(LEVELS), LABELS, "madry_fgsm", limit=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_craft_and_defense_on_cuda_count_as_on_the_cpu() -> None:
    source = Ensemble([Brightness(), Brightness()]).cuda()
    adversarial_set = craft(source, constant_images(LEVELS), LABELS, "madry_fgsm")
    assert adversarial_set.indices.tolist() == [1, 4, 5]
    assert adversarial_set.adversarial.device.type == "cpu" and adversarial_set.adversarial.dtype == torch.uint8
    assert torch.equal(adversarial_set.adversarial, constant_images([82, 108, 208]))
    assert defense(Brightness(shift=-0.03).cuda(), adversarial_set) == DefenseCounts(5, 3, 3, 3)
    assert noise(source, constant_images(LEVELS).cuda(), LABELS.cuda(), 0) == DefenseCounts(6, None, 5, 5)


def test_the_query_protocol_spends_exactly_the_forward_passes_it_counts() -> None:
    from rm_sweep.attacks import CountingModel, get_setting, square_linf
    from rm_sweep.evaluate import Target
    from rm_sweep.protocols import PROTOCOLS, Job

    setting = get_setting("square8_quick", max_queries=7)
    counting = CountingModel(Brightness())
    target = Target(counting, batch_size=4)
    images = constant_images(LEVELS)
    counts = PROTOCOLS["query"].count(target, Job(setting.name, setting.params(), 3), images, LABELS)
    # Brightness gets positions 0, 1, 3, 4, 5 right: the clean scan reads one batch (0-3) and finds
    # the first three, which are attacked with ids = their test positions, as alone here.
    alone = square_linf(Brightness(), images[[0, 1, 3]].float() / 255, LABELS[[0, 1, 3]], 8 / 255, 7, seed=0,
                        ids=torch.tensor([0, 1, 3]), quantise=True)
    assert counts.n_crafted == counts.n_evaluated == 3 and counts.n_defended == int((~alone.success).sum())
    assert (alone.queries <= 7).all() and counting.count == 4 + int(alone.queries.sum()) == target.passes
