"""Galleries like the paper's Fig. 1 and Fig. 12: clean test images beside their adversarials.

Fig. 1 and Fig. 12 show test images, the adversarials a normal network's gradients make of them,
and what a normal and a Random Mask network predict for each. ``make_gallery`` does that for a
store: a few test images every model involved classifies correctly, attacked on the CPU
(``rm_sweep.evaluate.craft``: seconds for a few images) from each source of the store's
black-box cells, and predicted by a normal and a masked target. ``gallery_html`` and
``draw_gallery`` show it.
"""
from __future__ import annotations

import html
import io
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image

from rm_sweep.attacks import AttackSetting, get_setting
from rm_sweep.data import load_dataset
from rm_sweep.errors import UserError
from rm_sweep.evaluate import craft, predict
from rm_sweep.query import labels
from rm_sweep.report_render import img
from rm_sweep.spec import data_identity
from rm_sweep.store import Store

DEFAULT_SETTING = "madry_pgd"  # Madry et al.'s PGD, eps 8/255: the paper's Fig. 14 / Table 1 attack
IMAGES = 6
CANDIDATES = 4  # test images attacked per image shown, to find ones whose attacks succeed
SCALE = 4  # pixels per image pixel in the HTML: 32x32 CIFAR images are too small to see otherwise


@dataclass(frozen=True)
class Shot:
    """One image of the gallery and what each target predicts for it.

    Attributes:
        image: (C, H, W) uint8, or None where the attack did not fool the source (the protocol
            keeps only adversarials that fool their source).
        predictions: class indices, one per target of the gallery (empty without an image).
    """

    image: torch.Tensor | None
    predictions: tuple[int, ...]


@dataclass(frozen=True)
class GalleryRow:
    """A test image (``test_index`` in attack order, true class ``label``): clean, then one
    adversarial per source."""

    test_index: int
    label: int
    clean: Shot
    adversarial: tuple[Shot, ...]


@dataclass(frozen=True)
class Gallery:
    """Test images, their adversarials from each source and the targets' predictions.

    Attributes:
        setting: the attack setting's name. classes: class names by index.
        sources, targets: (model id, label) of each source and target, in column order.
        rows: one per test image (none without sources, or when no test image is classified
            correctly by every model shown).
    """

    setting: str
    classes: tuple[str, ...]
    sources: tuple[tuple[str, str], ...]
    targets: tuple[tuple[str, str], ...]
    rows: tuple[GalleryRow, ...]


def gallery_setting(store: Store) -> AttackSetting:
    """``madry_pgd``, unless the store's black-box cells use another PGD setting and not it (an
    MNIST store's ``mnist_pgd``): then the most used one, as stored."""
    matrix = store.matrix()
    black = matrix[matrix["protocol"] == "black"]
    pgd = black[black["attack_params"].map(lambda p: json.loads(p).get("method") == "pgd")]
    if not len(pgd) or DEFAULT_SETTING in set(pgd["attack"]):
        return get_setting(DEFAULT_SETTING)
    name = pgd["attack"].value_counts().sort_index().idxmax()
    return AttackSetting.from_params(name, json.loads(pgd.loc[pgd["attack"] == name, "attack_params"].iloc[0]))


def _pick(store: Store, data: str, names: dict[str, str]) -> tuple[list[str], list[str]]:
    """Source ids (every model on ``data`` that is a black-box source, ordered by ``names``; none
    when the store has no such cells) and
    target ids (a normal and the most masked random-shallow model, preferring black-box targets
    that are no source)."""
    matrix, models = store.matrix(), store.models()
    black = matrix[(matrix["protocol"] == "black") & (matrix["target_kind"] == "model")]
    here = models[models["dataset"] == data].set_index("model_id")
    sources = sorted({s for s in black["source_id"] if s in here.index}, key=lambda s: names[s])
    attacked = set(black["target_id"])
    rank = here.assign(source=here.index.isin(sources), attacked=here.index.isin(attacked))
    normal = rank[(rank["shallow_ratio"] == 0) & (rank["deep_ratio"] == 0)]
    masked = rank[(rank["shallow_ratio"] > 0) & (rank["deep_ratio"] == 0) & (rank["variant"] == "random")]
    targets = []
    for kind, order, ascending in ((normal, ["source", "attacked"], [True, False]),
                                   (masked, ["shallow_ratio", "attacked", "source"], [False, False, True])):
        if len(kind):
            targets.append(kind.sort_values([*order, "seed", "mask_seed"], ascending=[*ascending, True, True],
                                            kind="stable").index[0])
    return sources, targets


def _first_correct(models: list[torch.nn.Module], images: torch.Tensor, truth: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the first ``n`` of ``images`` (N, C, H, W) that every model classifies as
    ``truth`` (N,) says (stops early)."""
    found: list[torch.Tensor] = []
    for start in range(0, len(images), 64):
        batch = slice(start, start + 64)
        ok = torch.ones(len(images[batch]), dtype=torch.bool)
        for model in models:
            ok &= predict(model, images[batch]) == truth[batch]
        found.append(torch.arange(start, start + len(ok))[ok])
        if sum(len(f) for f in found) >= n:
            break
    return torch.cat(found)[:n] if found else torch.zeros(0, dtype=torch.int64)


def make_gallery(store: Store, data: str, data_dir: str | os.PathLike | None = None, *, n: int = IMAGES) -> Gallery:
    """The gallery of ``store`` on the data set ``data`` (a spec: ``cifar10``, ``folder:PATH``).

    Args:
        store: models and cells; its models trained on ``data`` are used.
        data: where the test images are read (the models' own data set, by its identity).
        data_dir: downloads and decoded caches (default: ``rm_sweep.data.default_data_dir``).
        n: how many test images: of the first ``CANDIDATES * n`` that every source and target
            classifies correctly, those whose attacks fool the most sources.
    """
    identity = data_identity(data)
    models = store.models()
    if identity not in set(models["dataset"]):
        have = ", ".join(sorted(models["dataset"].unique())) or "none"
        raise UserError(f"--data {data} is not a data set the store's models were trained on ({have})")
    names = labels(store)
    source_ids, target_ids = _pick(store, identity, names)
    setting = gallery_setting(store)
    if not source_ids:
        return Gallery(setting.name, (), (), (), ())
    row = models.set_index("model_id").loc[source_ids[0]]
    dataset = load_dataset(data, data_dir=data_dir, train_subset=_subset(row["train_subset"]),
                           test_subset=_subset(row["test_subset"]))
    loaded = {i: store.load_model(i) for i in dict.fromkeys([*source_ids, *target_ids])}
    candidates = _first_correct(list(loaded.values()), dataset.test_x, dataset.test_y, CANDIDATES * n)
    images, truth = dataset.test_x[candidates], dataset.test_y[candidates]
    sources, targets = tuple((s, names[s]) for s in source_ids), tuple((t, names[t]) for t in target_ids)
    if not len(candidates):
        return Gallery(setting.name, dataset.classes, sources, targets, ())

    def shots(batch: torch.Tensor) -> list[Shot]:
        """(M, C, H, W) images, uint8 or floats in [0, 1] -> one ``Shot`` each, with every
        target's prediction of the image as given (shown rounded to 8 bits)."""
        predicted = [predict(loaded[t], batch) for t in target_ids]
        return [Shot(_uint8(batch[k]), tuple(int(p[k]) for p in predicted)) for k in range(len(batch))]

    columns = []
    for source_id in source_ids:
        crafted = craft(loaded[source_id], images, truth, setting, len(candidates), source_id=source_id,
                        indices=candidates)
        adversarial = dict(zip(crafted.indices.tolist(), shots(crafted.adversarial)))
        columns.append([adversarial.get(i, Shot(None, ())) for i in candidates.tolist()])
    # Like the paper's figures, show images whose attacks succeed: the most sources fooled first,
    # then test order; the chosen ones are shown in test order.
    fooled = [sum(c[k].image is not None for c in columns) for k in range(len(candidates))]
    chosen = sorted(sorted(range(len(candidates)), key=lambda k: -fooled[k])[:n])
    clean = shots(images[chosen])
    return Gallery(setting.name, dataset.classes, sources, targets,
                   tuple(GalleryRow(int(candidates[k]), int(truth[k]), shot, tuple(c[k] for c in columns))
                         for k, shot in zip(chosen, clean)))


def _subset(value: float | None) -> int | None:
    """A ``models`` row's subset size (NaN: the whole split)."""
    return None if pd.isna(value) else int(value)


def _uint8(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) uint8 of an image that is uint8 or floats in [0, 1] (unquantised settings)."""
    return image if image.dtype == torch.uint8 else image.mul(255).round().clamp(0, 255).to(torch.uint8)


def png(image: torch.Tensor, scale: int = SCALE) -> bytes:
    """(C, H, W) uint8 as PNG bytes, each pixel ``scale`` x ``scale`` (nearest: no blur)."""
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def _captions(gallery: Gallery, row: GalleryRow, shot: Shot) -> str:
    lines = []
    for (_, name), predicted in zip(gallery.targets, shot.predictions):
        kind = "right" if predicted == row.label else "wrong"
        lines.append(f'<div><span class="{kind}">{html.escape(gallery.classes[predicted])}</span> '
                     f'<small>({html.escape(name)})</small></div>')
    return "".join(lines)


def gallery_html(gallery: Gallery) -> str:
    """The gallery as an HTML table: a row per test image, clean first, then each source's
    adversarial, each with the targets' predicted classes (in red where wrong)."""
    head = "".join(f"<th>from {html.escape(name)}</th>" for _, name in gallery.sources)
    body = []
    for row in gallery.rows:
        truth = html.escape(gallery.classes[row.label])
        cells = [(f'<td>{img(png(row.clean.image), f"clean test image {row.test_index}: {truth}")}'
                  f"<div>true: <b>{truth}</b></div>{_captions(gallery, row, row.clean)}</td>")]
        for (_, source), shot in zip(gallery.sources, row.adversarial):
            if shot.image is None:
                cells.append('<td class="none">the attack did not fool the source</td>')
            else:
                alt = f"adversarial of test image {row.test_index} from {source}"
                cells.append(f"<td>{img(png(shot.image), alt)}{_captions(gallery, row, shot)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<table class="gallery"><thead><tr><th>clean</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def draw_gallery(gallery: Gallery) -> Figure:
    """The gallery as a figure (for the PDF): a row per image, titles the targets' predictions."""
    columns = 1 + len(gallery.sources)
    figure = Figure(figsize=(2.1 * columns, 2.3 * len(gallery.rows)), layout="constrained")
    axes = np.asarray(figure.subplots(len(gallery.rows), columns, squeeze=False))
    for r, row in enumerate(gallery.rows):
        for c, shot in enumerate([row.clean, *row.adversarial]):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_xlabel("clean" if c == 0 else f"from {gallery.sources[c - 1][1]}", fontsize=7)
                ax.xaxis.set_label_position("top")
            if shot.image is None:
                ax.text(0.5, 0.5, "source\nnot fooled", ha="center", va="center", fontsize=7)
                continue
            array = shot.image.permute(1, 2, 0).numpy()
            ax.imshow(array[..., 0] if array.shape[2] == 1 else array, cmap="gray", interpolation="nearest")
            ax.set_title("\n".join(gallery.classes[p] for p in shot.predictions), fontsize=7)
    names = "; ".join(f"line {k + 1}: {name}" for k, (_, name) in enumerate(gallery.targets))
    figure.suptitle(f"{gallery.setting} adversarials; predictions, {names}", fontsize=8)
    return figure


__all__ = ["DEFAULT_SETTING", "IMAGES", "Gallery", "GalleryRow", "Shot", "draw_gallery", "gallery_html",
           "gallery_setting", "make_gallery", "png"]
