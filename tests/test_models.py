"""The model zoo and Random Mask, as the paper defines them."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from rm_sweep.errors import UserError
from rm_sweep.masks import VARIANTS, MaskConfig, RandomMask, sample_mask
from rm_sweep.models import (
    count_parameters,
    create_model,
    list_models,
    load_checkpoint,
    save_checkpoint,
)

ARCHS = list_models()
PLACEMENTS = {"shallow": dict(shallow_ratio=0.7), "deep": dict(deep_ratio=0.5)}
WIDTH = 0.125  # small enough for the CPU, wide enough for every layer to have several channels


def masked_model(arch: str, variant: str, placement: str, seed: int = 0, **kw) -> nn.Module:
    mask = MaskConfig(variant=variant, seed=seed, **PLACEMENTS[placement])
    return create_model(arch, mask=mask, width=WIDTH, **kw)


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.mask for name, m in model.named_modules() if isinstance(m, RandomMask)}


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_model_compiles_as_one_graph_that_computes_the_eager_output(arch):
    """fit(compile=True) relies on it: a graph break per mask would leave CUDA graphs with
    dozens of pieces. Dynamo's eager backend traces without code generation (fast on a CPU)."""
    torch._dynamo.reset()
    model = masked_model(arch, "random", "shallow").eval().to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    eager = model(x)  # fills the eager path's mask cache first, as a training run would
    compiled = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)


def test_registry_lists_the_papers_five_architectures():
    assert ARCHS == ["densenet121", "resnet18", "resnet50", "senet18", "vgg19"]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
class TestEveryArchitectureVariantPlacement:
    def test_output_shape_for_cifar_and_mnist(self, arch, variant, placement):
        model = masked_model(arch, variant, placement)
        assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)
        mnist = masked_model(arch, variant, placement, in_channels=1, image_size=28)
        assert mnist(torch.rand(2, 1, 28, 28)).shape == (2, 10)

    def test_masked_positions_are_exactly_zero_for_any_input(self, arch, variant, placement):
        model = masked_model(arch, variant, placement).train()
        outputs = {}
        for name, m in model.named_modules():
            if isinstance(m, RandomMask):
                m.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(name, (mod.mask, out)))
        model(torch.rand(4, 3, 32, 32) * 3 - 1)  # inputs outside [0, 1] too: the mask must not care
        assert outputs, "no masked layer"
        for name, (mask, out) in outputs.items():
            assert (out[:, mask == 0] == 0).all(), name
        # The check above must not pass vacuously on all-zero activations.
        assert any((out[:, mask == 1] != 0).any() for mask, out in outputs.values())

    def test_mask_structure_follows_the_variant(self, arch, variant, placement):
        ratio = next(iter(PLACEMENTS[placement].values()))
        for name, mask in masks_of(masked_model(arch, variant, placement)).items():
            c, h, w = mask.shape
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            zeros = (mask == 0).flatten(1).sum(1)
            if variant == "random":
                assert (zeros == round(ratio * h * w)).all(), name
            elif variant == "same":
                assert (mask == mask[:1]).all(), name
                assert zeros[0] == round(ratio * h * w), name
            else:
                whole = (zeros == 0) | (zeros == h * w)
                assert whole.all(), name
                assert (zeros == h * w).sum() == round(ratio * c), name

    def test_masks_depend_on_the_seed_alone(self, arch, variant, placement):
        a = masks_of(masked_model(arch, variant, placement, seed=3))
        b = masks_of(masked_model(arch, variant, placement, seed=3))
        c = masks_of(masked_model(arch, variant, placement, seed=4))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)

    def test_checkpoint_round_trip_is_bit_identical(self, arch, variant, placement, tmp_path):
        model = masked_model(arch, variant, placement)
        model.train()(torch.rand(8, 3, 32, 32))  # move BatchNorm statistics off their initial values
        model.eval()
        save_checkpoint(model, tmp_path / "model.pt")
        loaded = load_checkpoint(tmp_path / "model.pt").eval()
        x = torch.rand(4, 3, 32, 32)
        assert torch.equal(model(x), loaded(x))
        assert loaded.config == model.config
        assert all(torch.equal(masks_of(model)[k], v) for k, v in masks_of(loaded).items())

    def test_no_gradient_reaches_a_masked_position(self, arch, variant, placement):
        model = masked_model(arch, variant, placement)
        grads = {}

        def keep_grad(mod: RandomMask, x: torch.Tensor, name: str) -> None:
            x.register_hook(lambda g: grads.__setitem__(name, (mod.mask, g)))

        for name, m in model.named_modules():
            if isinstance(m, RandomMask):
                # A hook on the input before the mask is applied: the gradient of the loss with
                # respect to the BatchNorm output, including its masked neurons.
                m.register_forward_pre_hook(lambda mod, args, name=name: keep_grad(mod, args[0], name))
        x = torch.rand(4, 3, 32, 32, requires_grad=True)
        nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
        assert grads
        for name, (mask, g) in grads.items():
            assert (g[:, mask == 0] == 0).all(), name
        assert any((g[:, mask == 1] != 0).any() for mask, g in grads.values())


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_resnet18_masks_ten_outputs_per_part(placement):
    model = masked_model("resnet18", "random", placement)
    names = list(masks_of(model))
    assert len(names) == 10
    if placement == "shallow":
        assert "body.mask1" in names and "body.layer2.0.shortcut.2" in names
        assert not any(".layer3" in n or ".layer4" in n for n in names)
    else:
        assert all(".layer3" in n or ".layer4" in n for n in names)


def test_unmasked_resnet18_is_the_standard_cifar_resnet18():
    assert count_parameters(create_model("resnet18")) == 11_173_962


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_masks_add_no_trainable_parameters(arch, variant):
    plain = create_model(arch, width=WIDTH)
    masked = create_model(arch, width=WIDTH, mask=MaskConfig(0.7, 0.5, variant))
    assert count_parameters(masked) == count_parameters(plain)
    assert all(not b.requires_grad for b in masks_of(masked).values())


def _conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_channel_multiplier_widens_exactly_the_masked_blocks_of_resnet18(placement):
    base = _conv_widths(masked_model("resnet18", "random", placement))
    wide = _conv_widths(create_model("resnet18", width=WIDTH, mask=MaskConfig(
        channel_multiplier=2, **PLACEMENTS[placement])))
    shallow = ("body.conv1", "body.layer1", "body.layer2")
    for name, channels in base.items():
        in_masked_part = name.startswith(shallow) == (placement == "shallow")
        assert wide[name] == (2 * channels if in_masked_part else channels), name


def test_channel_multiplier_widens_the_first_four_vgg_convs():
    base = list(_conv_widths(create_model("vgg19", width=WIDTH, mask=MaskConfig(0.5))).values())
    wide = list(_conv_widths(create_model("vgg19", width=WIDTH, mask=MaskConfig(0.5, channel_multiplier=2))).values())
    assert wide[:4] == [2 * c for c in base[:4]] and wide[4:] == base[4:]


def test_sample_mask_counts_exact_zeros():
    mask = sample_mask((5, 32, 32), 0.3, "random", seed=0, layer="x")
    assert ((mask == 0).flatten(1).sum(1) == round(0.3 * 1024)).all()
    assert not torch.equal(mask[0], mask[1])  # positions are independent per channel


@pytest.mark.parametrize("bad", [dict(shallow_ratio=1.0), dict(shallow_ratio=-0.1), dict(deep_ratio=1.2),
                                 dict(variant="stripes"), dict(channel_multiplier=0)])
def test_bad_mask_config_raises_one_clear_error(bad):
    with pytest.raises(UserError) as err:
        MaskConfig(**bad)
    assert next(iter(bad)).split("_")[0] in str(err.value) and "\n" not in str(err.value)


def test_unknown_architecture_raises_naming_it():
    with pytest.raises(UserError, match="unknown architecture 'resnet19'"):
        create_model("resnet19")


def test_corrupt_foreign_and_missing_checkpoints_raise_clear_errors(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    save_checkpoint(create_model("resnet18", width=WIDTH), tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:1000])
    for name, message in [("corrupt.pt", "corrupt"), ("truncated.pt", "corrupt"),
                          ("foreign.pt", "not an rm_sweep checkpoint"), ("missing.pt", "does not exist")]:
        with pytest.raises(UserError, match=message):
            load_checkpoint(tmp_path / name)
