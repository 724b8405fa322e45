"""The model zoo and Random Mask, as the paper defines them.

Counts and shapes marked "authors'" were taken by building the authors' model files
(tiangeluo/DefectiveCNN ``Models/``) with their masks replaced by ones.
"""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import nn

from rm_sweep.errors import UserError
from rm_sweep.masks import VARIANTS, MaskConfig, RandomMask, mask_shapes, sample_mask
from rm_sweep.models import (
    count_parameters,
    create_model,
    list_models,
    load_checkpoint,
    registry,
    save_checkpoint,
)
from rm_sweep.models.registry import LayerPlan, ModelConfig, build

ARCHS = list_models()
MASKING_VARIANTS = tuple(v for v in VARIANTS if v != "channel")  # DC narrows the network instead
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

    def test_checkpoint_round_trip_is_bit_identical(self, arch, variant, placement, tmp_path):
        model = masked_model(arch, variant, placement)
        model.train()(torch.rand(8, 3, 32, 32))  # move BatchNorm statistics off their initial values
        model.eval()
        save_checkpoint(model, tmp_path / "model.pt")
        loaded = load_checkpoint(tmp_path / "model.pt").eval()
        x = torch.rand(4, 3, 32, 32)
        assert torch.equal(model(x), loaded(x))
        assert loaded.config == model.config
        assert masks_of(loaded).keys() == masks_of(model).keys()
        assert all(torch.equal(masks_of(model)[k], v) for k, v in masks_of(loaded).items())


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("variant", MASKING_VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
class TestEveryMask:
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
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            zeros = (mask == 0).flatten(1).sum(1)
            h, w = mask.shape[1:]
            assert (zeros == round(ratio * h * w)).all(), name
            if variant == "same":
                assert (mask == mask[:1]).all(), name

    def test_masks_depend_on_the_seed_alone(self, arch, variant, placement):
        a = masks_of(masked_model(arch, variant, placement, seed=3))
        b = masks_of(masked_model(arch, variant, placement, seed=3))
        c = masks_of(masked_model(arch, variant, placement, seed=4))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)

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


# (C, H, W) of every mask at p = 0.5, full width. Shallow: the authors' files (resnet_drop_012_05,
# resnet50_drop_012_05, densenet_drop_012_05, senet_drop_012_05, vgg_drop_01_05).
SHALLOW_MASKS = {
    "resnet18": [(64, 32, 32)] * 5 + [(128, 16, 16)] * 5,
    "resnet50": [(64, 32, 32)] * 4 + [(128, 16, 16)] * 4,
    "densenet121": [(c, 32, 32) for c in range(64, 257, 32)] + [(c, 16, 16) for c in range(128, 513, 32)],
    "senet18": [(64, 32, 32)] * 5 + [(128, 16, 16)] * 3,
    "vgg19": [(64, 32, 32)] * 2 + [(128, 16, 16)] * 2,
}
# Deep: ResNet-18 is the authors' resnet_drop_34_05; the others had no deep file, so the shallow
# rule is applied to the deep blocks.
DEEP_MASKS = {
    # layer3 (256 channels, 8x8) and layer4 (512, 4x4): 2 blocks x 2 BatchNorms + the projection.
    "resnet18": [(256, 8, 8)] * (2 * 2 + 1) + [(512, 4, 4)] * (2 * 2 + 1),
    # One per bottleneck, after its (strided) 3x3 conv: 6 blocks in layer3, 3 in layer4.
    "resnet50": [(256, 8, 8)] * 6 + [(512, 4, 4)] * 3,
    # dense3 enters with 512 // 2 = 256 channels and grows by 32 per layer (24 layers), its
    # transition sees 256 + 24 * 32; dense4 enters with 1024 // 2 = 512 (16 layers, no transition).
    "densenet121": [(256 + 32 * i, 8, 8) for i in range(25)] + [(512 + 32 * i, 4, 4) for i in range(16)],
    # BN1 normalises a block's input, BN2 its first conv's output; layer3.0 enters at 128x16x16,
    # layer4.0 at 256x8x8.
    "senet18": [(128, 16, 16)] + [(256, 8, 8)] * 4 + [(512, 4, 4)] * 3,
    # Convs 5-16: four at 256x8x8, four at 512x4x4, four at 512x2x2.
    "vgg19": [(256, 8, 8)] * 4 + [(512, 4, 4)] * 4 + [(512, 2, 2)] * 4,
}
EXPECTED_MASKS = {"shallow": SHALLOW_MASKS, "deep": DEEP_MASKS}

# Where the shallow masks sit (module paths inside the Classifier), as the authors placed them.
SHALLOW_MASKED_LAYERS = {
    # Stem, both BatchNorms of every block, layer2's projection shortcut.
    "resnet18": ["body.mask1"] + [f"body.layer{i}.{j}.mask{k}" for i in (1, 2) for j in (0, 1) for k in (1, 2)]
    + ["body.layer2.0.shortcut.2"],
    # Stem, and each bottleneck's BatchNorm after its 3x3 conv only.
    "resnet50": ["body.mask1"] + [f"body.layer1.{j}.mask2" for j in range(3)]
    + [f"body.layer2.{j}.mask2" for j in range(4)],
    # Before each dense layer's 1x1 conv, and the transitions (features.1, features.3).
    "densenet121": [f"body.features.0.{j}.mask1" for j in range(6)] + ["body.features.1.mask"]
    + [f"body.features.2.{j}.mask1" for j in range(12)] + ["body.features.3.mask"],
    # Both BatchNorms of every block; not the stem.
    "senet18": [f"body.layer{i}.{j}.mask{k}" for i in (1, 2) for j in (0, 1) for k in (1, 2)],
    # After the first four convs' BatchNorms (conv, BN, mask, ReLU; a max pool after the second).
    "vgg19": ["body.2", "body.6", "body.11", "body.15"],
}

# Trainable parameters of the unmasked networks: the authors' resnet.py, densenet.py, senet.py, vgg.py.
PLAIN_PARAMETERS = {
    "resnet18": 11_173_962, "resnet50": 23_520_842, "densenet121": 6_956_298, "senet18": 11_260_354,
    "vgg19": 20_040_522,
}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_masks_sit_where_the_authors_put_them(arch, placement):
    ratios = dict(shallow_ratio=0.5) if placement == "shallow" else dict(deep_ratio=0.5)
    masks = masks_of(create_model(arch, mask=MaskConfig(**ratios)))
    assert sorted(tuple(m.shape) for m in masks.values()) == sorted(EXPECTED_MASKS[placement][arch])
    if placement == "shallow":
        assert sorted(masks) == sorted(SHALLOW_MASKED_LAYERS[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_unmasked_networks_have_the_authors_parameter_counts(arch):
    assert count_parameters(create_model(arch)) == PLAIN_PARAMETERS[arch]


@pytest.mark.parametrize("mask, parameters", [
    (MaskConfig(0.5), 11_173_962),  # resnet_drop_012_05
    (MaskConfig(0.5, variant="same"), 11_173_962),  # resnet_drop_012_05_same
    (MaskConfig(0.5, variant="channel"), 10_505_578),  # resnet_drop_012_dc05
    (MaskConfig(0.9, variant="channel"), 10_211_859),  # resnet_drop_012_dc09
    (MaskConfig(0.5, channel_multiplier=2), 13_537_162),  # resnet_drop_012_05_c20
    (MaskConfig(0.9, channel_multiplier=2), 13_537_162),  # resnet_drop_012_09_c20
])
def test_resnet18_variants_have_the_authors_parameter_counts(mask, parameters):
    assert count_parameters(create_model("resnet18", mask=mask)) == parameters


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", MASKING_VARIANTS)
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


@pytest.mark.parametrize(("size", "maps"), [(32, [32] * 2 + [16] * 2 + [8] * 4 + [4] * 4 + [2] * 4),
                                           (28, [28] * 2 + [14] * 2 + [7] * 4 + [3] * 4 + [1] * 4)])
def test_vgg_convs_run_at_the_authors_map_sizes(size, maps):
    """Floor pooling, as the authors' VGG-19s; on MNIST (``MNIST/Models/vgg_unfold.py``) the
    fifth pool is left out and the last four convs run at 1x1."""
    model = create_model("vgg19", width=WIDTH, in_channels=1 if size == 28 else 3, image_size=size,
                         mask=MaskConfig(deep_ratio=0.5))
    assert [shape[1] for shape in mask_shapes(model, torch.zeros(1, model.config.in_channels, size, size)).values()] \
        == maps[4:]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-1]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    model.eval()(torch.rand(2, model.config.in_channels, size, size))
    for h in hooks:
        h.remove()
    assert seen == maps


@pytest.mark.parametrize(("size", "ratio", "dropped"), [(32, 0.9, "round(0.9 x 4) = 4"), (28, 0.7, "round(0.7 x 1) = 1")])
@pytest.mark.parametrize("variant", MASKING_VARIANTS)
def test_a_mask_that_would_drop_every_unit_of_a_map_is_refused(size, ratio, dropped, variant):
    """VGG-19's last four convs run at 2x2 (1x1 on MNIST): a deep mask there at a high ratio would
    zero them whole and make the logits a constant."""
    with pytest.raises(UserError, match=rf"^the mask of body\.\d+ would drop every unit of its (2x2|1x1) maps "
                                        rf"\({re.escape(dropped)}\)"):
        create_model("vgg19", width=WIDTH, in_channels=1 if size == 28 else 3, image_size=size,
                     mask=MaskConfig(deep_ratio=ratio, variant=variant))


def test_on_a_1x1_map_a_ratio_rounding_to_no_unit_masks_nothing():
    """Documented in docs/fidelity.md: exactly round(p * H * W) zeros per channel."""
    assert sample_mask((4, 1, 1), 0.5, "random", 0, "layer").sum() == 4
    assert sample_mask((4, 2, 2), 0.5, "random", 0, "layer").sum() == 8


def _shallow_convs(arch: str, model: nn.Module) -> dict[str, nn.Conv2d]:
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if arch == "vgg19":
        return dict(list(convs.items())[:4])
    shallow = {"densenet121": ("body.conv1", "body.features.0.", "body.features.1.", "body.features.2.",
                               "body.features.3.")}.get(arch, ("body.conv1", "body.layer1.", "body.layer2."))
    return {n: m for n, m in convs.items() if n.startswith(shallow)}


@pytest.mark.parametrize("p, arch", [(0.5, arch) for arch in ARCHS] + [(0.9, "resnet18"), (0.9, "senet18"),
                                                                        (0.9, "vgg19")])
def test_dc_is_a_narrower_network_without_masks(p, arch):
    """DC at p: every shallow layer has ceil((1-p)C) of its C channels, and nothing is masked.

    At p = 0.9 only networks whose every layer width is planned: a bottleneck's 4x expansion
    and DenseNet's 4g bottleneck and halving transitions follow the planned widths instead.
    """
    plain = _shallow_convs(arch, create_model(arch))
    dc_model = create_model(arch, mask=MaskConfig(p, variant="channel"))
    dc = _shallow_convs(arch, dc_model)
    assert not masks_of(dc_model)
    for name, conv in plain.items():
        assert dc[name].out_channels == math.ceil((1 - p) * conv.out_channels - 1e-9), name


@pytest.mark.parametrize("p, channels, kept", [(0.5, 64, 32), (0.9, 64, 7), (0.9, 128, 13), (0.75, 64, 16),
                                               (0.1, 64, 58), (0.7, 10, 3)])
def test_dc_width_is_the_ceiling_of_the_kept_share_despite_float_error(p, channels, kept):
    plan = LayerPlan(1.0, MaskConfig(p, variant="channel"))
    assert plan.channels(channels, "shallow") == kept
    assert plan.channels(channels, "deep") == channels


@pytest.mark.parametrize("arch", ["resnet18", "senet18"])
@pytest.mark.parametrize("mask, projects", [
    (MaskConfig(0.5), False),
    (MaskConfig(0.5, variant="channel"), True),
    (MaskConfig(0.5, channel_multiplier=2), True),
    (MaskConfig(deep_ratio=0.5, channel_multiplier=2), False),
])
def test_a_resized_shallow_part_gives_layer1_an_unmasked_projection_shortcut(arch, mask, projects):
    """As the authors' c20, dc05 and dc09 ResNet-18s: layer1's first block projects its input
    with a 1x1 conv although the widths match; the projection carries no mask."""
    block = create_model(arch, width=WIDTH, mask=mask).body.layer1[0]
    shortcut = block.shortcut
    assert (shortcut is not None and not isinstance(shortcut, nn.Identity)) == projects
    if projects:
        conv = next(m for m in shortcut.modules() if isinstance(m, nn.Conv2d))
        assert conv.in_channels == conv.out_channels and conv.kernel_size == (1, 1)
        assert not masks_of(shortcut)


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


@pytest.mark.parametrize("arch", ARCHS)
def test_a_network_whose_weights_exceed_the_memory_available_is_refused_before_it_is_built(arch, monkeypatch):
    """The check counts on the meta device what the build allocates: refused one byte short of
    the model's state (weights, BatchNorm statistics and masks), built with exactly that much."""
    mask = MaskConfig(shallow_ratio=0.5, channel_multiplier=2.0)
    state = sum(t.numel() * t.element_size() for t in create_model(arch, mask=mask, width=WIDTH).state_dict().values())
    monkeypatch.setattr(registry, "_memory_available", lambda: state - 1)
    with pytest.raises(UserError, match=rf"^{arch} at width 0.125, channel multiplier 2 has [\d,]+ parameters: .* GiB "
                                        "of weights, buffers and masks, and this machine has .* GiB of memory available$"):
        create_model(arch, mask=mask, width=WIDTH)
    monkeypatch.setattr(registry, "_memory_available", lambda: state)
    create_model(arch, mask=mask, width=WIDTH)


def test_an_image_size_whose_masks_exceed_the_memory_is_refused_before_anything_is_allocated():
    """A checkpoint's config could ask for 10**6 x 10**6 images: 12 TB for the probe image alone."""
    with pytest.raises(UserError, match=r"^resnet18 at width 0.125 has [\d,]+ parameters: [\d,.]+ GiB of weights, "
                                        "buffers and masks, and this machine has"):
        create_model("resnet18", width=WIDTH, image_size=10**6, mask=MaskConfig(shallow_ratio=0.5))


@pytest.mark.parametrize("masked", [False, True])
def test_images_an_architecture_cannot_take_are_refused_when_it_is_built(masked):
    """VGG's one linear layer takes the 512 channels of a 1x1 map: 64x64 images leave 2x2."""
    mask = MaskConfig(shallow_ratio=0.5) if masked else None
    with pytest.raises(UserError, match=r"^vgg19 at width 0.125 cannot take 64x64 images \(mat1 and mat2"):
        create_model("vgg19", width=WIDTH, image_size=64, mask=mask)


@pytest.mark.parametrize("field", ["num_classes", "in_channels", "image_size"])
@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_a_config_without_a_positive_count_is_refused_in_one_line(field, value):
    config = dataclasses.replace(ModelConfig("resnet18", width=WIDTH), **{field: value})
    with pytest.raises(UserError, match=rf"^{field} must be a"):
        build(config)


def test_a_width_past_what_a_tensor_can_hold_is_one_error_not_an_allocation():
    with pytest.raises(UserError, match=r"^resnet18 at width 1e\+09 is too large to build \(.*overflow"):
        create_model("resnet18", width=1e9)


def test_an_arch_that_the_meta_device_cannot_build_is_built_for_real(monkeypatch):
    """The memory check builds on the meta device first; an architecture doing what meta tensors
    cannot (``.item()`` while it builds) is not refused for it."""
    def body(plan, in_channels, num_classes):
        inputs = int(torch.tensor(in_channels).item())  # raises on the meta device
        return nn.Sequential(nn.Flatten(), nn.Linear(inputs, num_classes))

    monkeypatch.setitem(registry._REGISTRY, "itemnet", body)
    monkeypatch.setitem(registry._REVISIONS, "itemnet", 1)
    with torch.device("meta"), pytest.raises((RuntimeError, NotImplementedError)):
        body(None, 3, 10)
    assert count_parameters(create_model("itemnet", in_channels=3, image_size=1)) == 3 * 10 + 10


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


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("config"), r"is damaged \(KeyError: 'config'\)"),
    (lambda c: c.pop("state_dict"), r"is damaged \(KeyError: 'state_dict'\)"),
    (lambda c: c.update(state_dict=[]), "does not match its config"),
    (lambda c: c["config"].update(mean="abc"), r"is damaged \(ValueError"),
    (lambda c: c["config"].update(width="x"), "width must be a number, got 'x'"),
], ids=["no-config", "no-state", "state-list", "mean-text", "width-text"])
def test_a_checkpoint_with_a_damaged_field_is_one_error_naming_it(tmp_path, change, message):
    """A zip-valid rm_sweep checkpoint whose fields are missing or of another type (crafted, or
    written by another tool): one ``UserError`` naming the file, not a ``KeyError`` from deep inside."""
    save_checkpoint(create_model("resnet18", width=WIDTH), tmp_path / "good.pt")
    ckpt = torch.load(tmp_path / "good.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=f"^checkpoint {re.escape(str(tmp_path / 'bad.pt'))}:? .*{message}"):
        load_checkpoint(tmp_path / "bad.pt")
