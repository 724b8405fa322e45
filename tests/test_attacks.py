"""FGSM, PGD and CW-L2 as the paper defines them, MI-FGSM as Dong et al. do, and the named settings table."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from rm_sweep.attacks import (
    CWL2,
    FGSM,
    PAPER_TABLE_COLUMNS,
    PGD,
    SETTINGS,
    AttackSetting,
    cw_l2,
    fgsm,
    get_setting,
    list_settings,
    mifgsm,
    pgd,
    round_to_8bit,
)
from rm_sweep.errors import UserError
from rm_sweep.masks import MaskConfig
from rm_sweep.models import create_model

from attack_models import random_batch, untrained_cnn

pytestmark = pytest.mark.usefixtures("one_thread")
# The transfer settings in L-inf with budgets in pixel units of CIFAR images (MNIST's is larger).
LINF_SETTINGS = [name for name, s in SETTINGS.items()
                 if not isinstance(s.method, CWL2) and not s.query and name != "mnist_pgd"]


def _fooled(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).argmax(1) != labels


# --- identical to independent implementations -------------------------------------------------


def reference_pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float,
                  steps: int) -> torch.Tensor:
    """The basic iterative method written differently: per-image gradients of a one-image loss
    (torch.func vmap of grad), then an explicit projection onto the ball, then clipping."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (params, buffers), (x[None],)), y[None])

    per_image_grad = vmap(grad(loss))
    x = images.clone()
    for _ in range(steps):
        x = x + step * torch.sign(per_image_grad(x, labels))
        x = torch.min(torch.max(x, images - eps), images + eps)
        x = torch.clamp(x, 0.0, 1.0)
    return x


@pytest.mark.parametrize("name", ["madry_fgsm", "fgsm32", "madry_pgd", "pgd16", "pgd16_step2"])
def test_attacks_equal_a_per_image_torch_func_reference(name: str) -> None:
    setting = get_setting(name, quantise=False)
    model, (images, labels) = untrained_cnn(torch.float64), random_batch(dtype=torch.float64)
    eps = setting.method.eps_255 / 255
    fgsm_ = isinstance(setting.method, FGSM)
    step, steps = (eps, 1) if fgsm_ else (setting.method.step_255 / 255, setting.method.steps)
    expected = reference_pgd(model, images, labels, eps, step, steps)
    got = setting.run(model, images, labels)
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", ["madry_fgsm", "fgsm16", "madry_pgd", "pgd16_step2"])
def test_attacks_equal_adversarial_robustness_toolbox(name: str) -> None:
    art_classifiers = pytest.importorskip("art.estimators.classification")
    art_evasion = pytest.importorskip("art.attacks.evasion")
    setting = get_setting(name, quantise=False)
    model, (images, labels) = untrained_cnn(), random_batch()
    classifier = art_classifiers.PyTorchClassifier(
        model, loss=nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]), nb_classes=10, clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    eps = setting.method.eps_255 / 255
    if isinstance(setting.method, FGSM):
        attack = art_evasion.FastGradientMethod(classifier, norm=math.inf, eps=eps)
    else:
        attack = art_evasion.ProjectedGradientDescent(
            classifier, norm=math.inf, eps=eps, eps_step=setting.method.step_255 / 255, max_iter=setting.method.steps,
            num_random_init=0, verbose=False,
        )
    expected = torch.from_numpy(attack.generate(images.numpy(), y=labels.numpy()))
    got = setting.run(model, images, labels)
    assert (got - expected).abs().max().item() <= 1e-6


# --- the budget and the [0, 1] contract -------------------------------------------------------


@pytest.mark.parametrize("quantise", [False, True])
@pytest.mark.parametrize("name", LINF_SETTINGS)
def test_linf_perturbation_never_exceeds_eps_and_images_stay_in_unit_range(name: str, quantise: bool) -> None:
    setting = get_setting(name, quantise=quantise)
    images, labels = random_batch(32, seed=1)
    adversarial = setting.run(untrained_cnn(), images, labels)
    assert adversarial.shape == images.shape and adversarial.dtype == images.dtype
    assert (adversarial - images).abs().max().item() <= setting.method.eps_255 / 255 + 1e-6
    assert adversarial.min().item() >= 0.0 and adversarial.max().item() <= 1.0
    assert (adversarial - images).abs().max().item() >= setting.method.eps_255 / 255 - 1e-6  # it does move


def test_quantised_results_are_8bit_levels() -> None:
    images, labels = random_batch(8)
    adversarial = pgd(untrained_cnn(), images, labels, 8 / 255, 2 / 255, 7, quantise=True)
    levels = adversarial * 255
    assert torch.equal(levels, levels.round())
    assert torch.equal(round_to_8bit(torch.tensor([0.0, 0.5 / 255 + 1e-4, 1.0])), torch.tensor([0.0, 1 / 255, 1.0]))


def test_random_start_is_seeded_and_stays_in_the_ball() -> None:
    model, (images, labels) = untrained_cnn(), random_batch(8)
    a, b, c = (pgd(model, images, labels, 8 / 255, 2 / 255, 3, random_start=True, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - images).abs().max().item() <= 8 / 255 + 1e-6


def test_each_image_is_attacked_independently_of_itsrandom_batch() -> None:
    model, (images, labels) = untrained_cnn(torch.float64), random_batch(12, dtype=torch.float64)
    whole = pgd(model, images, labels, 8 / 255, 2 / 255, 7)
    halves = torch.cat([pgd(model, images[:5], labels[:5], 8 / 255, 2 / 255, 7),
                        pgd(model, images[5:], labels[5:], 8 / 255, 2 / 255, 7)])
    assert (whole - halves).abs().max().item() <= 1e-9


def test_bf16_autocast_option_keeps_the_contract() -> None:
    images, labels = random_batch(8)
    model, dtypes = untrained_cnn(), []
    model.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    adversarial = pgd(model, images, labels, 8 / 255, 2 / 255, 3, amp=True)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the forward passes ran under autocast
    assert (adversarial - images).abs().max().item() <= 8 / 255 + 1e-6
    assert 0.0 <= adversarial.min().item() and adversarial.max().item() <= 1.0


# --- strength on a trained model ---------------------------------------------------------------


@pytest.mark.parametrize(("one_step", "iterative"), [("madry_fgsm", "madry_pgd"), ("fgsm16", "pgd16")])
def test_pgd_fools_at_least_as_many_images_as_fgsm(trained, correct, one_step: str, iterative: str) -> None:
    images, labels = correct
    by_fgsm = _fooled(trained, get_setting(one_step).run(trained, images, labels), labels).sum().item()
    by_pgd = _fooled(trained, get_setting(iterative).run(trained, images, labels), labels).sum().item()
    assert by_pgd >= by_fgsm


def test_white_box_madry_pgd_drops_accuracy_below_ten_percent(trained, cifar) -> None:
    images, labels = cifar["test_x"], cifar["test_y"]
    adversarial = get_setting("madry_pgd").run(trained, images, labels)
    with torch.no_grad():
        accuracy = (trained(adversarial).argmax(1) == labels).float().mean().item()
    assert accuracy < 0.10


def test_cw_finds_smaller_l2_perturbations_than_pgd(trained, correct) -> None:
    images, labels = correct[0][:24], correct[1][:24]
    by_cw = cw_l2(trained, images, labels, kappa=0.0, search_steps=4, max_steps=50, lr=0.01, initial_const=1.0)
    by_pgd = get_setting("madry_pgd", quantise=False).run(trained, images, labels)
    both = _fooled(trained, by_cw, labels) & _fooled(trained, by_pgd, labels)
    assert both.sum().item() >= 12
    l2 = lambda x: (x - images)[both].flatten(1).norm(dim=1).mean().item()  # noqa: E731
    assert l2(by_cw) < l2(by_pgd)


@pytest.mark.parametrize("kappa", [0.0, 2.0])
def test_cw_adversarials_clear_the_confidence_margin_and_failures_stay_clean(trained, correct, kappa: float) -> None:
    images, labels = correct[0][:12], correct[1][:12]
    adversarial = cw_l2(trained, images, labels, kappa=kappa, search_steps=3, max_steps=40, lr=0.01, initial_const=1.0)
    changed = (adversarial != images).flatten(1).any(1)
    with torch.no_grad():
        logits = trained(adversarial)
    real = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], -math.inf).amax(1)
    assert changed.any()
    assert (other[changed] > real[changed] + kappa - 1e-4).all()
    assert 0.0 <= adversarial.min().item() and adversarial.max().item() <= 1.0


# --- the model is left as it was ---------------------------------------------------------------


ATTACKS = {
    "fgsm": lambda m, x, y: fgsm(m, x, y, 8 / 255),
    "pgd": lambda m, x, y: pgd(m, x, y, 8 / 255, 2 / 255, 3),
    "mifgsm": lambda m, x, y: mifgsm(m, x, y, 8 / 255, 1 / 255, 3),
    "cw_l2": lambda m, x, y: cw_l2(m, x, y, search_steps=2, max_steps=5),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("training", [True, False])
def test_model_runs_in_eval_mode_and_is_restored(attack: str, training: bool) -> None:
    model = create_model("resnet18", width=0.125, mask=MaskConfig(shallow_ratio=0.5))
    model.train(training)
    if training:
        model.body.eval()  # a submodule whose mode differs from its parent's must keep it
    modes_before = {name: m.training for name, m in model.named_modules()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    images, labels = random_batch(4, size=32)
    ATTACKS[attack](model, images, labels)
    assert seen and not any(seen)
    assert {name: m.training for name, m in model.named_modules()} == modes_before
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())  # BN stats untouched
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


# --- the settings table ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "attack", "eps_255", "step_255", "steps"),
    [
        ("madry_fgsm", FGSM, 8, None, None),
        ("madry_pgd", PGD, 8, 2, 7),
        ("fgsm16", FGSM, 16, None, None),
        ("fgsm32", FGSM, 32, None, None),
        ("pgd16", PGD, 16, 1, 20),
        ("pgd16_step2", PGD, 16, 2, 10),
        ("pgd32", PGD, 32, 1, 40),
    ],
)
def test_linf_settings_are_the_papers(name, attack, eps_255, step_255, steps) -> None:
    setting = get_setting(name)
    m = setting.method
    assert (type(m), m.eps_255, getattr(m, "step_255", None), getattr(m, "steps", None)) == (
        attack, eps_255, step_255, steps)
    assert getattr(m, "random_start", False) is False and setting.limit == 5000


@pytest.mark.parametrize(("name", "kappa"), [("cw40", 40), ("cw20", 20)])
def test_cw_settings_are_the_papers(name: str, kappa: float) -> None:
    setting = get_setting(name)
    m = setting.method
    assert (type(m), m.kappa, m.search_steps, setting.limit) == (CWL2, kappa, 30, 1000)


@pytest.mark.parametrize("name", list_settings())
def test_every_setting_records_its_parameters(name: str) -> None:
    setting = SETTINGS[name]
    params = setting.params()
    assert params["method"] == setting.method.method and params["quantise"] is setting.quantise
    assert set(params) - {"method", "quantise"} == {f.name for f in dataclasses.fields(setting.method)}
    assert all(isinstance(v, (bool, int, float, str)) for v in params.values())
    assert AttackSetting.from_params(name, params, limit=setting.limit, source=setting.source) == setting


def test_paper_table_columns_name_real_settings() -> None:
    assert set(PAPER_TABLE_COLUMNS) == {"fgsm_1", "fgsm_2", "fgsm_3", "pgd_1", "pgd_2", "pgd_3"}
    assert all(name in SETTINGS for name in PAPER_TABLE_COLUMNS.values())


def test_overrides_replace_fields_and_keep_the_table_intact() -> None:
    assert get_setting("madry_pgd", quantise=False).params()["quantise"] is False
    assert SETTINGS["madry_pgd"].quantise is True


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_setting_name_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown attack setting 'pgd7'"):
        get_setting("pgd7")


def test_unknown_override_is_a_user_error() -> None:
    with pytest.raises(UserError, match="epsilon: unknown field"):
        get_setting("madry_pgd", epsilon=3)


def test_inconsistent_setting_is_a_user_error() -> None:
    with pytest.raises(UserError, match="steps: unknown field"):
        AttackSetting.from_params("odd", {"method": "fgsm", "eps_255": 8, "steps": 3})


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_images_outside_unit_range_are_a_user_error(attack: str, bad: float) -> None:
    images, labels = random_batch(4)
    images[0, 0, 0, 0] = bad
    with pytest.raises(UserError, match=r"images must lie in \[0, 1\]"):
        ATTACKS[attack](untrained_cnn(), images, labels)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_mismatched_batch_sizes_are_a_user_error(attack: str) -> None:
    images, labels = random_batch(4)
    with pytest.raises(UserError, match="batch sizes differ: 4 images but 3 labels"):
        ATTACKS[attack](untrained_cnn(), images, labels[:3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"eps": -1 / 255}, "eps must be"), ({"step": 0.0}, "step must be"), ({"steps": 0}, "steps must be")],
)
def test_bad_budgets_are_user_errors(kwargs: dict, message: str) -> None:
    images, labels = random_batch(2)
    args = {"eps": 8 / 255, "step": 2 / 255, "steps": 7} | kwargs
    with pytest.raises(UserError, match=message):
        pgd(untrained_cnn(), images, labels, **args)


# --- MI-FGSM (Dong et al. 2018), with the authors' (step, steps, eps) in /255 units ------------

AUTHORS_MIFGSM = [(1, 10, 8), (1, 20, 16), (2, 10, 16), (1, 40, 32)]


def reference_mifgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float,
                     steps: int, decay: float) -> torch.Tensor:
    """Dong et al.'s Algorithm 1 written per image: vmap of a one-image gradient, its L1 norm by
    ``torch.linalg.vector_norm``, an explicit projection onto the ball, then clipping."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (params, buffers), (x[None],)), y[None])

    per_image_grad = vmap(grad(loss))
    x, g = images.clone(), torch.zeros_like(images)
    for _ in range(steps):
        gradient = per_image_grad(x, labels)
        g = decay * g + gradient / torch.linalg.vector_norm(gradient, ord=1, dim=(1, 2, 3), keepdim=True)
        x = x + step * torch.sign(g)
        x = torch.min(torch.max(x, images - eps), images + eps)
        x = torch.clamp(x, 0.0, 1.0)
    return x


@pytest.mark.parametrize(("step_255", "steps", "eps_255"), AUTHORS_MIFGSM[:3])
def test_mifgsm_equals_a_per_image_torch_func_reference(step_255: int, steps: int, eps_255: int) -> None:
    model, (images, labels) = untrained_cnn(torch.float64), random_batch(dtype=torch.float64)
    expected = reference_mifgsm(model, images, labels, eps_255 / 255, step_255 / 255, steps, decay=1.0)
    got = mifgsm(model, images, labels, eps_255 / 255, step_255 / 255, steps)
    assert (got - expected).abs().max().item() <= 1e-9


@pytest.mark.parametrize(("step_255", "steps", "eps_255", "decay"), [(1, 10, 8, 1.0), (2, 10, 16, 1.0), (1, 20, 16, 0.5)])
def test_mifgsm_equals_adversarial_robustness_toolbox(step_255: int, steps: int, eps_255: int, decay: float) -> None:
    """ART's MomentumIterativeMethod normalises by the per-image L1 norm too (Dong et al.'s choice)."""
    art_classifiers = pytest.importorskip("art.estimators.classification")
    art_evasion = pytest.importorskip("art.attacks.evasion")
    model, (images, labels) = untrained_cnn(), random_batch()
    classifier = art_classifiers.PyTorchClassifier(
        model, loss=nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]), nb_classes=10, clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    attack = art_evasion.MomentumIterativeMethod(
        classifier, norm=math.inf, eps=eps_255 / 255, eps_step=step_255 / 255, decay=decay, max_iter=steps,
        verbose=False,
    )
    expected = torch.from_numpy(attack.generate(images.numpy(), y=labels.numpy()))
    got = mifgsm(model, images, labels, eps_255 / 255, step_255 / 255, steps, decay)
    assert (got - expected).abs().max().item() <= 1e-6


def test_mifgsm_without_momentum_is_pgd() -> None:
    model, (images, labels) = untrained_cnn(torch.float64), random_batch(dtype=torch.float64)
    assert torch.equal(mifgsm(model, images, labels, 8 / 255, 2 / 255, 7, decay=0.0),
                       pgd(model, images, labels, 8 / 255, 2 / 255, 7))


@pytest.mark.parametrize("quantise", [False, True])
@pytest.mark.parametrize(("step_255", "steps", "eps_255"), AUTHORS_MIFGSM)
def test_mifgsm_stays_within_eps_and_quantises_to_8bit_levels(step_255: int, steps: int, eps_255: int,
                                                             quantise: bool) -> None:
    images, labels = random_batch(16, seed=2)
    adversarial = mifgsm(untrained_cnn(), images, labels, eps_255 / 255, step_255 / 255, steps, quantise=quantise)
    assert adversarial.shape == images.shape and adversarial.dtype == images.dtype
    assert (adversarial - images).abs().max().item() <= eps_255 / 255 + 1e-6
    assert adversarial.min().item() >= 0.0 and adversarial.max().item() <= 1.0
    if quantise:
        levels = adversarial * 255
        assert torch.equal(levels, levels.round())


def test_mifgsm_fools_the_trained_model_at_least_as_often_as_fgsm(trained, correct) -> None:
    images, labels = correct
    by_fgsm = _fooled(trained, fgsm(trained, images, labels, 8 / 255), labels).sum().item()
    by_mifgsm = _fooled(trained, mifgsm(trained, images, labels, 8 / 255, 1 / 255, 10), labels).sum().item()
    assert by_mifgsm >= by_fgsm


# --- on a GPU ----------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["madry_fgsm", "madry_pgd", "pgd16"])
def test_attacks_on_cuda_equal_the_cpu_result(name: str) -> None:
    setting = get_setting(name, quantise=False)
    model, (images, labels) = untrained_cnn(torch.float64), random_batch(dtype=torch.float64)
    on_cpu = setting.run(model, images, labels)
    on_gpu = setting.run(model.cuda(), images.cuda(), labels.cuda())
    assert on_gpu.device.type == "cuda"
    assert (on_gpu.cpu() - on_cpu).abs().max().item() <= 1e-6


@pytest.mark.gpu
@needs_cuda
def test_bf16_autocast_on_cuda_keeps_the_contract_on_a_zoountrained_cnn() -> None:
    model = create_model("resnet18", width=0.25, mask=MaskConfig(shallow_ratio=0.5)).cuda()
    images, labels = (t.cuda() for t in random_batch(64, size=32))
    for adversarial in (fgsm(model, images, labels, 8 / 255, amp=True),
                        pgd(model, images, labels, 8 / 255, 2 / 255, 7, amp=True, quantise=True)):
        assert (adversarial - images).abs().max().item() <= 8 / 255 + 1e-6
        assert 0.0 <= adversarial.min().item() and adversarial.max().item() <= 1.0
    adversarial = cw_l2(model, images, labels, search_steps=2, max_steps=20, lr=0.01, amp=True)
    assert adversarial.dtype == images.dtype and 0.0 <= adversarial.min().item() and adversarial.max().item() <= 1.0
