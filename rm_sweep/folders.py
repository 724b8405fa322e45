"""ImageFolder data sets (``folder:PATH``): what a decoded cache of one depends on, and decoding it.

A folder holds ``train/<class>/<image>`` and ``test/<class>/<image>``. ``rm_sweep.data`` keeps its
decoded uint8 arrays in a cache named by ``fingerprint``; ``decode`` reads the images.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from rm_sweep.errors import UserError

if TYPE_CHECKING:
    from torchvision.io import ImageReadMode

SPLITS = ("train", "test")


def check_folder(path: Path) -> Path:
    """``path`` resolved, if it is a directory with ``train/`` and ``test/`` subfolders."""
    if not path.is_dir():
        raise UserError(f"data folder {path} does not exist")
    for split in SPLITS:
        if not (path / split).is_dir():
            raise UserError(f"data folder {path} has no {split}/ subfolder (expected {split}/<class>/<image>)")
    return path.resolve()


def fingerprint(root: Path) -> dict:
    """What decoded arrays of the folder ``root`` depend on: its path, and every entry under its
    splits with its size, modification time and status-change time (ns), hashed.

    Replacing an image in place, even by one of the same size with its old modification time
    restored (``touch -r``, ``cp -p``, ``rsync -t``, an archive extracted again), changes the
    file's status-change time, which no user-space tool can set: the key changes without
    reading a byte of any image. On the 60,000-JPEG CIFAR-10 folder (benchmarks/README.md): 0.47 s
    per load on a quiet 2-core machine (the old per-directory key: milliseconds), where hashing
    the 55 MB of images takes 1.3 s with the files in the page cache, 6.6 s on a loaded machine
    and 30 s cold, and decoding them (a cache miss) 11 s. Every Ray worker loads the data set,
    so the key is paid once per trial.
    """
    digest = hashlib.sha256()
    count = 0
    for split in SPLITS:
        for rel, stat in _entries(root / split, split):
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\n".encode())
            count += 1
    return {"spec": "folder", "path": str(root), "entries": count, "files": digest.hexdigest()}


def _entries(directory: Path, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, stat) of ``directory``'s entries, recursively, in sorted order (links followed)."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"cannot list data folder {directory}: {exc.strerror or exc}") from None
    for entry in entries:
        path = f"{rel}/{entry.name}"
        try:
            stat = entry.stat()
        except OSError as exc:
            raise UserError(f"cannot read {entry.path}: {exc.strerror or exc}") from None
        yield path, stat
        if entry.is_dir():
            yield from _entries(Path(entry.path), path)


def decode(path: Path) -> dict:
    """Decode an ImageFolder's train/ and test/ into uint8 arrays (N, C, H, W) and labels.

    Channels are decided by every image, not by the first: grayscale (1 channel) only when every
    image is grayscale (with or without alpha); otherwise RGB, grayscale images repeated into 3
    channels and alpha dropped. Each image is decoded as stored; the few that do not match are
    decoded again in the chosen mode (torchvision's own conversion).
    """
    import torchvision
    from torchvision.io import ImageReadMode

    root = check_folder(path)
    try:
        splits = {s: torchvision.datasets.ImageFolder(root / s, loader=str) for s in SPLITS}
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise UserError(f"data folder {path}: {' '.join(str(exc).split())}") from None
    if splits["train"].classes != splits["test"].classes:
        raise UserError(f"data folder {path}: train/ and test/ have different class folders")
    files = {name: [file for file, _ in ds.samples] for name, ds in splits.items()}
    with _quiet_decoder():
        images = {name: _decode_all(names, path.name) for name, names in files.items()}
        gray = all(image.shape[0] <= 2 for split in images.values() for image in split)
        mode, channels = (ImageReadMode.GRAY, 1) if gray else (ImageReadMode.RGB, 3)
        height, width = images["train"][0].shape[1:]
        if height != width:
            raise UserError(f"data folder {path}: images are {height}x{width}; square images are required")
        out: dict = {"classes": list(splits["train"].classes)}
        for name, decoded in images.items():
            for i, file in enumerate(files[name]):
                if decoded[i].shape[0] != channels:
                    decoded[i] = _read_image(file, mode)
                if decoded[i].shape[1:] != (height, width):
                    raise UserError(f"{file} is {decoded[i].shape[1]}x{decoded[i].shape[2]}, "
                                    f"other images are {height}x{width}")
            out[f"{name}_x"] = torch.stack(decoded)
            out[f"{name}_y"] = torch.tensor(splits[name].targets, dtype=torch.int64)
    return out


def _decode_all(files: list[str], label: str) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode

    with tqdm(total=len(files), desc=f"decoding {label}", unit="img", leave=False, disable=None) as bar:
        decoded = []
        for file in files:
            decoded.append(_read_image(file, ImageReadMode.UNCHANGED))
            bar.update()
    return decoded


def _read_image(file: str, mode: ImageReadMode) -> torch.Tensor:
    from torchvision.io import decode_image, read_file

    try:
        image = decode_image(read_file(file), mode=mode)
    except RuntimeError as exc:
        raise UserError(f"cannot decode image {file}: {str(exc).splitlines()[0]}") from None
    if image.dtype == torch.uint16:  # a 16-bit PNG: to the 8 bits every other image has
        image = (image.to(torch.int32) * 255 + 32767).div(65535, rounding_mode="floor").to(torch.uint8)
    return image


@contextmanager
def _quiet_decoder() -> Iterator[None]:
    """torchvision's decoder is ~4x faster than Pillow (60,000 CIFAR JPEGs in ~10 s on one core).
    torchvision 0.29 deprecates it in favour of torchcodec and warns on every call; the project
    pins torchvision 0.29, so that warning is silenced while decoding."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        yield


__all__ = ["SPLITS", "check_folder", "decode", "fingerprint"]
