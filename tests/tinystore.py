"""Small stores built by hand for the matrix, figure and query tests (no Ray, no sweep).

A learnable toy data set (noise tinted by a class colour) is written as an
ImageFolder; tiny ResNet-18s are trained on it in-process for a few epochs and stored. Matrix
cells can be computed in one process with ``rm_sweep.evaluate`` (``reference_counts``): the
ground truth the Ray matrix must reproduce.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from rm_sweep.attacks import AttackSetting
from rm_sweep.data import Dataset, load_dataset
from rm_sweep.ensemble import Ensemble
from rm_sweep.evaluate import DefenseCounts, craft, defense, white_box
from rm_sweep.masks import MaskConfig
from rm_sweep.pipeline import matrix_images
from rm_sweep.protocols import noise, patch_shuffle
from rm_sweep.spaces import SearchSpace, load_space
from rm_sweep.spec import MatrixCell, ModelSpec
from rm_sweep.store import Store
from rm_sweep.train import fit

from scaffold import tiny_space, write_space

CLASSES, SIZE = 4, 16


# -- stores built without training: untrained tiny models with chosen metrics ---------------------
DATA = "folder:/somewhere/cifar10-jpeg"


def tiny_data() -> Dataset:
    """A 10-class, 32x32 RGB data set of noise: enough to build and run models."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.arange(20) % 10
    return Dataset("folder:cifar10-jpeg", x, y, x, y, tuple(str(c) for c in range(10)), (0.5,) * 3, (0.25,) * 3)


def spec(**changes) -> ModelSpec:
    fields = {"arch": "resnet18", "data": DATA, "width": 0.125, "train_subset": 200, "recipe": "quick"}
    return ModelSpec(**{**fields, **changes})


def metrics(acc: float = 0.5) -> dict:
    return {"clean_accuracy": acc, "epochs": 1, "train_accuracy": 0.4, "train_loss": 1.9, "train_seconds": 3.0}


def matrix_rows(source: str, targets: list[str], attack: str = "madry_pgd") -> list[dict]:
    return [dict(protocol="black", source_id=source, target_id=t, target_kind="model", attack=attack,
                 attack_params={"attack": "pgd", "eps_255": 8, "step_255": 2, "steps": 7}, limit=100,
                 n_crafted=100, n_fooled_source=90, n_evaluated=60, n_defended=15, defense_rate=0.25)
            for t in targets]


def add_models(store: Store, n: int) -> list[tuple[ModelSpec, torch.nn.Module]]:
    out = []
    for i in range(n):
        s = spec(mask=MaskConfig(shallow_ratio=0.5, seed=i))
        model = s.create(tiny_data())
        store.add_model(s, metrics(0.1 * i), model)
        out.append((s, model))
    return out


def write_tinted_folder(root: Path, *, train: int = 40, test: int = 25, seed: int = 0) -> Path:
    """Noisy 16x16 RGB images (PNG, exact pixels); class c < 3 tints channel c, class 3 is untinted.

    The tint is weak against the noise, so trained models are good but not perfect and small
    attacks fool some images: the counts of every protocol are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    for split, per_class in (("train", train), ("test", test)):
        for c in range(CLASSES):
            folder = root / split / f"q{c}"
            folder.mkdir(parents=True, exist_ok=True)
            x = torch.randint(0, 200, (per_class, SIZE, SIZE, 3), generator=gen, dtype=torch.uint8)
            if c < 3:
                x[..., c] += 40
            for i, image in enumerate(x):
                Image.fromarray(image.numpy()).save(folder / f"{i:03d}.png")
    return root


def space_file(root: Path, data: Path, models: list[dict], matrix: list[dict], *, name: str = "tiny",
               epochs: int = 6) -> Path:
    """A search-space YAML of tiny ResNet-18s (width 0.125) on ``data``."""
    return write_space(root / f"{name}.yaml", tiny_space(name, data, models, matrix, epochs=epochs))


def train_models(space: SearchSpace, store: Store, data_dir: Path) -> None:
    """Train every model of the space in this process and add it (and its ensembles) to the store.

    One torch thread: on a shared 2-core machine two threads are several times slower for
    models this small."""
    torch.set_num_threads(1)
    stored = store.model_ids()
    for spec in space.models():
        if spec.model_id in stored:
            continue
        data = load_dataset(space.data, data_dir=data_dir, train_subset=spec.train_subset,
                            test_subset=spec.test_subset)
        model = spec.create(data)
        metrics = fit(model, data, spec.recipe_config(), device="cpu", seed=spec.seed)
        store.add_model(spec, metrics, model)
    for ensemble in space.ensembles():
        store.add_ensemble(ensemble)


def build(root: Path, data_dir: Path, models: list[dict], matrix: list[dict], **kwargs: Any) -> tuple[SearchSpace, Store]:
    """Data folder + space file + trained models under ``root``; returns the loaded space and its store."""
    data = write_tinted_folder(root / "tinted")
    space = load_space(space_file(root, data, models, matrix, **kwargs))
    store = Store(root / "store")
    train_models(space, store, data_dir)
    return space, store


def build_filled(root: Path, data_dir: Path, models: list[dict], matrix: list[dict],
                 **kwargs: Any) -> tuple[SearchSpace, Store]:
    """``build``, then every matrix cell of the space computed in this process and stored."""
    space, store = build(root, data_dir, models, matrix, **kwargs)
    images, labels = matrix_images(space, data_dir)
    counts = reference_counts(space, store, list(space.cells), images, labels)
    store.add_matrix({**dataclasses.asdict(c), **counts[c.key()].as_dict()} for c in space.cells)
    return space, store


def reference_counts(space: SearchSpace, store: Store, cells: list[MatrixCell], images: torch.Tensor,
                     labels: torch.Tensor) -> dict[tuple, DefenseCounts]:
    """Every cell computed in this process with ``rm_sweep.evaluate`` (one ``craft`` per source and
    setting, then ``defense`` / ``white_box`` / ``noise`` / ``patch_shuffle`` per cell), by cell key."""
    torch.set_num_threads(1)
    crafted: dict[tuple, Any] = {}
    return {cell.key(): _reference(space, store, cell, images, labels, crafted) for cell in cells}


def _reference(space: SearchSpace, store: Store, cell: MatrixCell, images: torch.Tensor, labels: torch.Tensor,
               crafted: dict[tuple, Any]) -> DefenseCounts:
    def load(unit_id: str) -> torch.nn.Module:
        """A model, or an ensemble of the space, from the store."""
        members = [e.member_ids for e in space.ensembles() if e.ensemble_id == unit_id]
        if members:
            return Ensemble([store.load_model(m) for m in members[0]]).eval()
        return store.load_model(unit_id)

    params = json.loads(cell.attack_params)
    target = load(cell.target_id)
    if cell.protocol == "noise":
        return noise(target, images, labels, params["sigma_255"], limit=cell.limit)
    if cell.protocol == "shuffle":
        return patch_shuffle(target, images, labels, params["patches"], limit=cell.limit)
    if cell.protocol == "query":
        return query_counts(target, AttackSetting.from_params(cell.attack, params), images, labels, cell.limit)
    key = (cell.source_id, cell.attack, cell.attack_params, cell.limit)
    if key not in crafted:
        setting = AttackSetting.from_params(cell.attack, params)
        crafted[key] = craft(load(cell.source_id), images, labels, setting, cell.limit, source_id=cell.source_id)
    adversarial = crafted[key]
    return white_box(adversarial) if cell.protocol == "white" else defense(target, adversarial)


def query_counts(model: torch.nn.Module, setting: AttackSetting, images: torch.Tensor, labels: torch.Tensor,
                 limit: int) -> DefenseCounts:
    """The query protocol computed directly: the first ``limit`` test images the model gets
    right, attacked one by one (ids = test-set positions, seed 0), counted by hand."""
    with torch.no_grad():
        right = (model(images.float() / 255).argmax(1) == labels).nonzero().flatten()[:limit]
    results = [setting.method(model, images[i:i + 1].float() / 255, labels[i:i + 1], seed=0, ids=right[j:j + 1],
                              quantise=setting.quantise) for j, i in enumerate(right.tolist())]
    fooled = [int(r.queries) for r in results if bool(r.success)]
    median = statistics.median(fooled) if fooled else math.nan
    return DefenseCounts(len(right), None, len(right), len(results) - len(fooled), median_queries=median)
