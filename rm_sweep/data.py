"""Data sets by name, decoded once into cached uint8 arrays, served as augmented batches on device.

One spec names a data set everywhere: ``cifar10`` and ``mnist`` (torchvision's readers, downloaded
into the data directory when the network allows) or ``folder:PATH`` (an ImageFolder directory with
``train/`` and ``test/``). Images reach models as float tensors in [0, 1]; normalisation is the
model's own first layer, so attack budgets stay in pixel units.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rm_sweep import folders
from rm_sweep.atomic import atomic_torch_save, cannot_create
from rm_sweep.errors import UserError
from rm_sweep.recipes import AUGMENTATIONS
from rm_sweep.spec import DataSpec, parse_data_spec

CROP_PADDING = 4
_CACHE_FORMAT = "rm_sweep.data_cache/2"  # 2: folder keys by file; channels by every image


def default_data_dir() -> Path:
    """``$RM_SWEEP_DATA_DIR`` or ``~/.cache/rm_sweep``: downloads and decoded caches live here."""
    return Path(os.environ.get("RM_SWEEP_DATA_DIR") or Path.home() / ".cache" / "rm_sweep")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set in memory.

    Attributes:
        name: the spec it was loaded from (``str(DataSpec)``).
        train_x, test_x: uint8 (N, C, H, W), pixel values 0..255.
        train_y, test_y: int64 (N,), class indices 0..num_classes-1.
        classes: class names, in label order.
        mean, std: per-channel statistics of the full training split in [0, 1] units
            (what the model's ``Normalize`` layer needs).
        augment: the paper's augmentation for this data set (one of ``AUGMENTATIONS``).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = field(default="crop-flip")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[2]


def load_dataset(
    spec: str | DataSpec,
    *,
    data_dir: str | os.PathLike | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a data set, decoding it only on first use (later loads read a cached uint8 file).

    ``train_subset``/``test_subset`` keep n images, as equal per class as n allows (n divisible
    by the class count gives exactly n/classes each), chosen by ``seed``; each split's choice
    depends only on its own n and the seed.

    The test split comes in attack order: the protocols attack "the first N test images the
    source gets right", which the paper took in CIFAR-10's own order, where classes are mixed.
    torchvision's CIFAR-10 and MNIST keep that order; a folder's test split (sorted by class)
    is put in a fixed class-interleaved order (``interleave_classes``), so any first N images
    hold every class in proportion.
    """
    spec = parse_data_spec(spec)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    arrays = _cached_arrays(spec, data_dir)
    # One generator per split: the test images do not depend on the training subset's size.
    train = balanced_subset(arrays["train_y"], train_subset, torch.Generator().manual_seed(seed), "train_subset")
    test = balanced_subset(arrays["test_y"], test_subset, torch.Generator().manual_seed(seed), "test_subset")
    if spec.kind == "folder":
        test = test[interleave_classes(arrays["test_y"][test])]
    return Dataset(
        name=str(spec),
        train_x=arrays["train_x"][train],
        train_y=arrays["train_y"][train],
        test_x=arrays["test_x"][test],
        test_y=arrays["test_y"][test],
        classes=tuple(arrays["classes"]),
        mean=tuple(arrays["mean"].tolist()),
        std=tuple(arrays["std"].tolist()),
        augment=spec.augment,
    )


def balanced_subset(labels: torch.Tensor, n: int | None, gen: torch.Generator, what: str = "subset") -> torch.Tensor:
    """Indices (sorted, int64) of ``n`` items with ``n // C`` per class (the first ``n % C``
    classes get one more); all indices when ``n`` is None."""
    if n is None:
        return torch.arange(len(labels))
    classes = int(labels.max()) + 1
    if not isinstance(n, int) or isinstance(n, bool) or n < classes:
        raise UserError(f"{what} must be an integer of at least {classes} (one per class), got {n!r}")
    picked = []
    for c in range(classes):
        members = (labels == c).nonzero().flatten()
        want = n // classes + (c < n % classes)
        if want > len(members):
            raise UserError(f"{what}={n} needs {want} images of class {c}, the data set has {len(members)}")
        picked.append(members[torch.randperm(len(members), generator=gen)[:want]])
    return torch.cat(picked).sort().values


def interleave_classes(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed order of positions (int64) in which every class is spread evenly.

    Each class's items are shuffled (seeded), then item r of a class of n items is placed at
    (r + 1/2) / n along the whole order, ties broken by class: every prefix of the order holds
    each class in proportion to its share, within 1 + C/2 items for C classes (a balanced set
    cycles through the classes: exact at every multiple of C).

    Args:
        labels: (N,) int64 class of each item, in its stored order.
        seed: the within-class shuffle.
    """
    n = len(labels)
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    by_class = shuffled[labels[shuffled].argsort(stable=True)]  # grouped by class, shuffled within
    counts = labels.bincount()
    first = counts.cumsum(0) - counts
    rank = torch.empty(n, dtype=torch.float64)
    rank[by_class] = (torch.arange(n) - first[labels[by_class]]).double()
    key = (rank + 0.5) / counts[labels].double()
    # Sorting by (key, class): the key alone ties whenever two classes have equal counts.
    return torch.from_numpy(np.lexsort((labels.numpy(), key.numpy())))


def _cached_arrays(spec: DataSpec, data_dir: Path) -> dict:
    """The whole data set as uint8 arrays plus classes and statistics, from the cache or decoded."""
    key = _cache_key(spec, data_dir)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    label = spec.kind if spec.path is None else Path(key["path"]).name
    path = data_dir / "arrays" / f"{label}-{digest}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if cached.get("format") == _CACHE_FORMAT and cached.get("key") == key:
                return cached
        except Exception:  # a cache half-written by another version is rebuilt, never fatal
            pass
    _check_cache_dir(path.parent, data_dir)  # before minutes of decoding, not after
    arrays = _decode(spec, data_dir)
    arrays["mean"], arrays["std"] = channel_stats(arrays["train_x"])
    arrays.update(format=_CACHE_FORMAT, key=key)
    atomic_torch_save(arrays, path)
    return arrays


def _check_cache_dir(directory: Path, data_dir: Path) -> None:
    """A ``UserError`` unless the decoded data set can be saved in ``directory`` (created when saved)."""
    problem = cannot_create(directory)
    if problem is not None:
        raise UserError(f"data dir {data_dir}: cannot save the decoded data set: {problem}; give --data-dir "
                        "(or $RM_SWEEP_DATA_DIR) a folder this user may write")


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std, in [0, 1] units, of uint8 images (N, C, H, W); float32 (C,) each."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in x.split(4096):  # float64 copies of 50,000 images would need 1.2 GB at once
        chunk = chunk.double().div_(255)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    count = x.numel() / x.shape[1]
    mean = total / count
    return mean.float(), (squares / count - mean.square()).sqrt().float()


def _cache_key(spec: DataSpec, data_dir: Path) -> dict:
    """What the cached arrays depend on: for folders, ``folders.fingerprint`` (every file's
    name, size and times); for downloaded data sets, the spec and where they are downloaded."""
    if spec.path is None:
        return {"spec": str(spec), "root": str(data_dir.resolve())}
    return folders.fingerprint(folders.check_folder(Path(spec.path)))


def _decode(spec: DataSpec, data_dir: Path) -> dict:
    # The decoders import torchvision themselves, so only a cache miss pays for it (~1 s of
    # CPU, otherwise paid by every Ray worker that merely loads the cached arrays).
    if spec.kind == "folder":
        return folders.decode(Path(spec.path))
    return _decode_torchvision(spec.kind, data_dir)


def _decode_torchvision(kind: str, data_dir: Path) -> dict:
    """CIFAR-10 or MNIST through torchvision, downloading into ``data_dir`` if allowed."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.MNIST
    root = data_dir / "torchvision"
    try:
        splits = [cls(root, train=train, download=False) for train in (True, False)]
    except RuntimeError:
        try:
            splits = [cls(root, train=train, download=True) for train in (True, False)]
        except Exception as exc:  # URLError, HTTP errors, checksum failures: all mean "not available"
            reason = " ".join(str(exc).split())[:200]
            raise UserError(f"{kind} not found in {root} and it could not be downloaded: {reason}") from None
    out: dict = {"classes": list(splits[0].classes)}
    for name, ds in zip(("train", "test"), splits):
        x = torch.as_tensor(ds.data)
        # CIFAR-10 stores (N, H, W, C) numpy arrays, MNIST (N, H, W) tensors.
        out[f"{name}_x"] = x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x.unsqueeze(1).contiguous()
        out[f"{name}_y"] = torch.as_tensor(ds.targets, dtype=torch.int64)
    return out


class DeviceLoader:
    """Batches from uint8 images kept on ``device``: float (B, C, H, W) in [0, 1] and int64 (B,).

    The whole array moves to the device once; each epoch draws its order and augmentation from
    ``generator`` (a CPU generator, so a saved generator state replays the same epoch) and applies
    them to whole batches with tensor ops.

    Args:
        x: uint8 (N, C, H, W). y: int64 (N,).
        augment: ``crop-flip`` (zero-pad 4, random crop back to H x W, random horizontal flip),
            ``flip`` or ``none``.
        shuffle: a fresh random order each epoch.
        drop_last: skip the final partial batch (training keeps every batch the same shape).
        channels_last: return batches in channels-last memory format.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        augment: str = "none",
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        channels_last: bool = False,
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise UserError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if x.dtype != torch.uint8 or x.ndim != 4 or len(x) != len(y):
            raise ValueError(f"expected uint8 images (N, C, H, W) and N labels, got {x.dtype} {tuple(x.shape)}, {len(y)}")
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.batch_size = min(batch_size, len(x))
        self.augment, self.shuffle, self.drop_last = augment, shuffle, drop_last
        self.generator = generator if generator is not None else torch.Generator()
        self.channels_last = channels_last

    def __len__(self) -> int:
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, g = len(self.x), self.generator
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        pad = CROP_PADDING if self.augment == "crop-flip" else 0
        # Every random draw of the epoch happens here, up front, in a fixed order.
        shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g).bool() if self.augment != "none" else torch.zeros(n, dtype=torch.bool)
        order, shifts, flips = order.to(self.device), shifts.to(self.device), flips.to(self.device)
        for i in range(len(self)):
            sel = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sel]
            images = self.x[idx]
            if self.augment != "none":
                images = crop_flip(images, shifts[sel], flips[sel], pad)
            images = images.float().div_(255)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.y[idx]


def crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad ``x`` (B, C, H, W) by ``pad``, crop each image back to H x W at offset
    ``shifts[b] = (dy, dx)`` (each in [0, 2 * pad]) and mirror it left-right where ``flips[b]``.

    Two gathers over the whole batch; dtype and value range are unchanged.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = shifts[:, :1] + ar_h  # (B, H)
    cols = shifts[:, 1:] + torch.where(flips[:, None], w - 1 - ar_w, ar_w)  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


__all__ = [
    "CROP_PADDING",
    "Dataset",
    "DeviceLoader",
    "balanced_subset",
    "channel_stats",
    "crop_flip",
    "default_data_dir",
    "interleave_classes",
    "load_dataset",
]
