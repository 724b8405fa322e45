"""rm_sweep.data: data set specs, cached arrays, balanced subsets and on-device augmentation."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rm_sweep.folders as folders_mod
from rm_sweep.data import (
    CROP_PADDING,
    DeviceLoader,
    balanced_subset,
    interleave_classes,
    load_dataset,
)
from rm_sweep.errors import UserError
from rm_sweep.spec import DataSpec, parse_data_spec

from imagefolder import write_image_folder


@pytest.mark.parametrize("text, spec", [
    ("cifar10", DataSpec("cifar10")),
    ("mnist", DataSpec("mnist")),
    ("folder:../shared/data/cifar10-jpeg", DataSpec("folder", "../shared/data/cifar10-jpeg")),
    ("folder:/abs/with:colon", DataSpec("folder", "/abs/with:colon")),
])
def test_spec_parses_and_prints_back(text: str, spec: DataSpec) -> None:
    assert parse_data_spec(text) == spec
    assert str(spec) == text


@pytest.mark.parametrize("text", ["imagenet", "folder:", "cifar10:x", "", "CIFAR10"])
def test_unknown_spec_is_a_user_error(text: str) -> None:
    with pytest.raises(UserError, match="data set|needs a path"):
        parse_data_spec(text)


@pytest.mark.parametrize("spec, augment", [("cifar10", "crop-flip"), ("mnist", "flip"), ("folder:x", "crop-flip")])
def test_paper_augmentation_per_data_set(spec: str, augment: str) -> None:
    assert parse_data_spec(spec).augment == augment


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_loads_exact_pixels_labels_and_statistics(tmp_path: Path, channels: int) -> None:
    expected = write_image_folder(tmp_path / "ds", channels=channels)
    ds = load_dataset(f"folder:{tmp_path / 'ds'}", data_dir=tmp_path / "cache")
    for key in ("train_x", "train_y"):
        assert torch.equal(getattr(ds, key), expected[key]), key
    order = interleave_classes(expected["test_y"])  # the test split comes in attack order
    assert torch.equal(ds.test_x, expected["test_x"][order]) and torch.equal(ds.test_y, expected["test_y"][order])
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (3, channels, 8)
    assert ds.classes == ("c0", "c1", "c2")
    pixels = expected["train_x"].double() / 255
    assert ds.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert ds.std == pytest.approx(pixels.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-6)


def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders decoded from now on (a load that reads the cache decodes nothing)."""
    decode, calls = folders_mod.decode, []
    monkeypatch.setattr(folders_mod, "decode", lambda path: calls.append(path) or decode(path))
    return calls


def test_second_load_reads_the_cache_and_a_changed_folder_is_decoded_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ds"
    write_image_folder(folder)
    load_dataset(f"folder:{folder}", data_dir=tmp_path / "cache")
    calls = decodes(monkeypatch)
    again = load_dataset(f"folder:{folder}", data_dir=tmp_path / "cache")
    assert calls == [] and len(again.train_x) == 36
    (folder / "train" / "c0" / "0000.png").unlink()
    changed = load_dataset(f"folder:{folder}", data_dir=tmp_path / "cache")
    assert len(calls) == 1 and len(changed.train_x) == 35


def _same_size_other_pixels(path: Path) -> None:
    """Rewrite the PNG at ``path`` with other pixels and the same file size, restoring its times."""
    before = path.stat()
    with Image.open(path) as image:
        pixels = np.asarray(image).copy()
    for shift in range(1, 256):
        Image.fromarray(((pixels.astype(int) + shift) % 256).astype(np.uint8)).save(path)
        if path.stat().st_size == before.st_size:
            break
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _other_size(path: Path) -> None:
    stamp = path.stat()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def _new_mtime(path: Path) -> None:
    Image.new("RGB", (8, 8), (7, 8, 9)).save(path)


@pytest.mark.parametrize("replace", [_same_size_other_pixels, _other_size, _new_mtime],
                         ids=["same-size-and-mtime", "other-size", "new-mtime"])
def test_an_image_replaced_in_place_is_decoded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     replace) -> None:
    """Same names, other images: the stale decoded cache is not served (the cache key holds each
    file's size, modification and status-change times; see folders.fingerprint)."""
    folder = tmp_path / "ds"
    write_image_folder(folder)
    first = load_dataset(f"folder:{folder}", data_dir=tmp_path / "cache")
    image = folder / "train" / "c0" / "0000.png"
    replace(image)
    calls = decodes(monkeypatch)
    again = load_dataset(f"folder:{folder}", data_dir=tmp_path / "cache")
    with Image.open(image) as replaced:
        pixels = torch.from_numpy(np.asarray(replaced.convert("RGB")).copy()).permute(2, 0, 1)
    assert calls == [folder] and torch.equal(again.train_x[0], pixels)
    assert not torch.equal(first.train_x[0], pixels) and torch.equal(again.train_x[1:], first.train_x[1:])


@pytest.mark.parametrize("gray, channels", [("train/c0/0000.png", 3), ("*/*/*.png", 1)],
                         ids=["first-gray-rest-rgb", "all-gray"])
def test_channels_are_decided_by_every_image(tmp_path: Path, gray: str, channels: int) -> None:
    """A folder whose first image (sorted) is grayscale is still an RGB data set; only a folder
    of grayscale images decodes to one channel."""
    folder = tmp_path / "ds"
    rgb = write_image_folder(folder)["train_x"]
    files = sorted(folder.glob(gray), key=lambda p: (p.relative_to(folder).parts[0] != "train", p))
    for file in files:
        with Image.open(file) as image:
            image.convert("L").save(file)
    ds = load_dataset(f"folder:{folder}", data_dir=tmp_path / "cache")
    assert ds.in_channels == channels and ds.test_x.shape[1] == channels
    with Image.open(files[0]) as image:
        gray = torch.from_numpy(np.asarray(image).copy())
    assert all(torch.equal(ds.train_x[0, c], gray) for c in range(channels))  # replicated into RGB
    if channels == 3:
        assert torch.equal(ds.train_x[1:], rgb[1:])


@pytest.mark.parametrize("sixteen", ["train/c0/0000.png", "*/*/*.png"], ids=["one", "all"])
def test_a_16_bit_png_is_read_as_the_8_bits_of_the_others(tmp_path: Path, sixteen: str) -> None:
    """16-bit PNGs (value v * 257 stands for v) decode to the uint8 images every data set holds."""
    folder = tmp_path / "ds"
    write_image_folder(folder)
    files = sorted(folder.glob(sixteen), key=lambda p: (p.relative_to(folder).parts[0] != "train", p))
    eight = []
    for file in files:
        with Image.open(file) as image:
            gray = np.asarray(image.convert("L"))
        eight.append(torch.from_numpy(gray.copy()))
        Image.fromarray(gray.astype(np.uint16) * 257).save(file)
    ds = load_dataset(f"folder:{folder}", data_dir=tmp_path / "cache")
    assert ds.train_x.dtype == torch.uint8
    assert all(torch.equal(channel, eight[0]) for channel in ds.train_x[0])


def test_loading_a_cached_data_set_does_not_import_torchvision(tmp_path: Path) -> None:
    """Every Ray worker loads data from the cache; torchvision's import (~1 s of CPU) is paid
    only by the process that decodes."""
    folder = tmp_path / "ds"
    write_image_folder(folder)
    load_dataset(f"folder:{folder}", data_dir=tmp_path / "cache")
    code = ("import sys; from rm_sweep.data import load_dataset; import rm_sweep.train; "
            f"load_dataset('folder:{folder}', data_dir='{tmp_path / 'cache'}'); print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_real_cifar_folder_has_cifar10_shape_and_classes(cifar_folder: Path, data_dir: Path) -> None:
    ds = load_dataset(f"folder:{cifar_folder}", data_dir=data_dir)
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    assert torch.equal(ds.train_y.bincount(), torch.full((10,), 5000))
    assert ds.mean == pytest.approx((0.491, 0.482, 0.447), abs=0.005)  # CIFAR-10's own, JPEG aside


@pytest.mark.parametrize("layout, message", [
    ((), "does not exist"),
    (("test",), "no train/"),
    (("train",), "no test/"),
])
def test_bad_folder_is_a_user_error(tmp_path: Path, layout: tuple[str, ...], message: str) -> None:
    folder = tmp_path / "ds"
    if layout:
        write_image_folder(folder, splits=layout)
    with pytest.raises(UserError, match=message):
        load_dataset(f"folder:{folder}", data_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_download_without_network_is_a_user_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(UserError, match=f"^{name} not found in .* could not be downloaded") as info:
        load_dataset(name, data_dir=tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("n, per_class", [(30, [10, 10, 10]), (31, [11, 10, 10]), (3, [1, 1, 1])])
def test_subset_is_balanced(n: int, per_class: list[int]) -> None:
    labels = torch.arange(3).repeat(50)
    idx = balanced_subset(labels, n, torch.Generator().manual_seed(0))
    assert len(idx) == len(set(idx.tolist())) == n
    assert labels[idx].bincount().tolist() == per_class


def test_subset_is_fixed_by_seed() -> None:
    labels = torch.arange(10).repeat(100)
    pick = lambda seed: balanced_subset(labels, 50, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(pick(1), pick(1))
    assert not torch.equal(pick(1), pick(2))


def test_load_dataset_subsets(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "ds", classes=3, train=12, test=6)
    spec = f"folder:{tmp_path / 'ds'}"
    a = load_dataset(spec, data_dir=tmp_path / "c", train_subset=9, test_subset=6, seed=4)
    b = load_dataset(spec, data_dir=tmp_path / "c", train_subset=9, test_subset=6, seed=4)
    assert a.train_y.bincount().tolist() == [3, 3, 3] and a.test_y.bincount().tolist() == [2, 2, 2]
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    test_only = load_dataset(spec, data_dir=tmp_path / "c", test_subset=6, seed=4)
    assert torch.equal(test_only.test_x, a.test_x)  # the test images do not depend on the training subset


@pytest.mark.parametrize("counts", [[50, 50, 50], [30, 10, 20], [1, 7, 100, 13]])
def test_interleaved_order_holds_every_class_in_proportion_in_every_prefix(counts: list[int]) -> None:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])  # sorted by class, as a folder
    order = interleave_classes(labels)
    assert sorted(order.tolist()) == list(range(len(labels)))
    seen = torch.zeros(len(counts))
    total = torch.tensor(counts, dtype=torch.float64)
    for k, position in enumerate(order.tolist(), start=1):
        seen[labels[position]] += 1
        assert ((seen - k * total / total.sum()).abs() <= 1 + len(counts) / 2).all(), k
    assert torch.equal(order, interleave_classes(labels)) and not torch.equal(order, interleave_classes(labels, seed=1))


def test_cifar_folder_attack_sets_cover_every_class_in_proportion(cifar_folder: Path, data_dir: Path) -> None:
    # The protocols attack the first N test images a source gets right (CW: N = 1000). In the
    # folder's own order those would be airplanes and cars only.
    for subset in (None, 2000):
        ds = load_dataset(f"folder:{cifar_folder}", data_dir=data_dir, test_subset=subset)
        share = ds.test_y[:1000].bincount(minlength=10).double() / 1000
        assert ((share - 0.1).abs() <= 0.3 * 0.1).all(), share


@pytest.mark.parametrize("n", [2, 37, 0])
def test_impossible_subset_is_a_user_error(n: int) -> None:
    labels = torch.arange(3).repeat(12)
    with pytest.raises(UserError, match="train_subset"):
        balanced_subset(labels, n, torch.Generator(), "train_subset")


def _candidates(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded image, each with and without a left-right mirror."""
    c, h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    crops = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return crops + [crop.flip(-1) for crop in crops]


@pytest.mark.parametrize("augment, pad", [("crop-flip", CROP_PADDING), ("flip", 0)])
def test_augmentation_is_a_real_crop_and_flip_in_unit_range(augment: str, pad: int) -> None:
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(64)
    loader = DeviceLoader(x, y, 16, augment=augment, generator=torch.Generator().manual_seed(0))
    out = torch.cat([images for images, _ in loader])
    assert out.shape == (64, 3, 8, 8) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    crops, centre = (2 * pad + 1) ** 2, (2 * pad + 1) * pad + pad
    shifted = flipped = 0
    for original, augmented in zip(x.float() / 255, out):
        matches = [i for i, cand in enumerate(_candidates(original, pad)) if torch.equal(cand, augmented)]
        assert matches, "output is not a crop/flip of its input"
        shifted += all(i % crops != centre for i in matches)
        flipped += all(i >= crops for i in matches)
    assert 12 < flipped < 52  # half of 64 images, give or take 5 standard deviations
    if pad:
        assert shifted > 48  # an unshifted crop is 1 of 81 outcomes


def test_no_augmentation_is_identity_and_order_is_kept_without_shuffle() -> None:
    x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    loader = DeviceLoader(x, torch.arange(10), 4)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), x.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(10))


def test_shuffled_epochs_cover_each_item_once_and_replay_from_generator_state() -> None:
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(3)
    loader = DeviceLoader(x, torch.arange(50), 8, augment="crop-flip", shuffle=True, drop_last=True, generator=gen)
    state = gen.get_state()
    first = list(loader)
    assert len(first) == 6
    labels = torch.cat([b[1] for b in first])
    assert len(set(labels.tolist())) == 48
    second = torch.cat([b[1] for b in loader])
    assert not torch.equal(labels, second)
    gen.set_state(state)
    replay = list(loader)
    assert len(replay) == len(first) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, replay))
