"""Fig. 14 from the store: clean accuracy and black-box defense rate against the shallow drop ratio.

The paper's Fig. 14 shows, for ResNet-18 with Random Mask on the shallow blocks, how black-box
defense (FGSM and PGD in Madry et al.'s setting, from a normally trained ResNet-18) rises with
the drop ratio while clean accuracy falls. Here the points come from the store's rows only:
``is_fig14_cell`` is the one rule for which cells those are, applied to a search space's cells
(``fig14_cells``) or, without a space, to every stored cell; ``fig14_rows`` reads them,
``fig14_summary`` takes mean and standard deviation over seeds, ``fig14_table`` prints that, and
``draw_fig14`` draws them (and the paper's points, when asked) as PNG, SVG and PDF and returns
what it drew.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from rm_sweep.atomic import atomic_write_bytes
from rm_sweep.errors import UserError
from rm_sweep.paper_results import FIG14_METRICS as METRICS
from rm_sweep.spaces import SearchSpace
from rm_sweep.spec import MATRIX_KEY, MatrixCell, ModelSpec
from rm_sweep.stats import widest_cells, wilson
from rm_sweep.store import Store

SETTINGS = tuple(m for m in METRICS if m != "clean_accuracy")  # the attack settings drawn
LABELS = {"clean_accuracy": "clean accuracy", "madry_fgsm": "FGSM defense (Madry, eps 8)",
          "madry_pgd": "PGD defense (Madry, eps 8, 7 x 2)"}
COLORS = {"clean_accuracy": "tab:green", "madry_fgsm": "tab:blue", "madry_pgd": "tab:red"}


def is_fig14_model(model: Mapping[str, Any] | None) -> bool:
    """Whether a model (a ``models`` row, or any mapping with its ``architecture``,
    ``deep_ratio``, ``variant`` and ``channel_multiplier``) can be in Fig. 14: a single ResNet-18
    whose only mask, if any, is a random one on the shallow blocks (deep masks, other variants and
    channel multipliers are other figures'). None (an ensemble, or no model) cannot."""
    return model is not None and model["architecture"] == "resnet18" and model["deep_ratio"] == 0 \
        and model["variant"] == "random" and model["channel_multiplier"] == 1


def is_fig14_cell(protocol: str, attack: str, target_kind: str, source: Mapping[str, Any] | None,
                  target: Mapping[str, Any] | None) -> bool:
    """The one rule for what Fig. 14 draws: black-box ``madry_fgsm`` / ``madry_pgd`` from a normal
    ResNet-18 onto a single ResNet-18 with at most a random shallow mask. ``source`` and
    ``target`` are models as ``is_fig14_model`` reads them (None where the id names no model)."""
    return protocol == "black" and attack in SETTINGS and target_kind == "model" and is_fig14_model(source) \
        and source["shallow_ratio"] == 0 and is_fig14_model(target)


def _model_fields(spec: ModelSpec) -> dict[str, Any]:
    """A spec as the ``models`` columns ``is_fig14_model`` reads."""
    mask = spec.mask
    return {"architecture": spec.arch, "shallow_ratio": mask.shallow_ratio, "deep_ratio": mask.deep_ratio,
            "variant": mask.variant, "channel_multiplier": mask.channel_multiplier}


def fig14_cells(space: SearchSpace) -> list[MatrixCell]:
    """The space's cells that Fig. 14 draws (``is_fig14_cell``)."""
    models = {m.model_id: _model_fields(m) for m in space.models()}
    return [c for c in space.cells
            if is_fig14_cell(c.protocol, c.attack, c.target_kind, models.get(c.source_id), models.get(c.target_id))]


def fig14_rows(store: Store, space: SearchSpace | None = None, *, allow_empty: bool = False) -> pd.DataFrame:
    """One row per (source, target) pair of Fig. 14 that the store holds, with the target's
    clean accuracy and both defense rates, in percent.

    Args:
        store: where the cells and models are read.
        space: take the space's ``fig14_cells``; None: every stored cell that ``is_fig14_cell``
            admits (a store read without its search space, as the report does).
        allow_empty: return an empty frame instead of raising ``UserError`` when there are none.

    Returns:
        Columns ``source_id``, ``target_id``, ``shallow_ratio``, ``seed``, ``mask_seed``,
        ``width``, ``clean_accuracy``, ``madry_fgsm``, ``madry_pgd`` (a rate is NaN if its cell
        is missing), and each rate's counts ``<setting>_defended``, ``<setting>_evaluated``.
    """
    matrix = store.matrix()
    models = store.models().set_index("model_id")
    if space is not None:
        keys = {c.key() for c in fig14_cells(space)}
        in_figure = [tuple(k) in keys for k in matrix[list(MATRIX_KEY)].itertuples(index=False)]
    else:
        by_id = models.to_dict("index")
        in_figure = [is_fig14_cell(r.protocol, r.attack, r.target_kind, by_id.get(r.source_id), by_id.get(r.target_id))
                     for r in matrix.itertuples(index=False)]
    matrix = matrix[pd.Series(in_figure, index=matrix.index, dtype=bool)]
    counts = [f"{setting}_{count}" for setting in SETTINGS for count in ("defended", "evaluated")]
    columns = ["source_id", "target_id", "shallow_ratio", "seed", "mask_seed", "width", *METRICS, *counts]
    if not len(matrix):
        if allow_empty:
            return pd.DataFrame(columns=columns)
        where = f"of space {space.name}" if space is not None else "(black-box madry_fgsm / madry_pgd from a normal " \
                                                                   "ResNet-18 onto shallow-masked ResNet-18s)"
        raise UserError(f"store {store.uri} holds no Fig. 14 cells {where}")
    # One cell per pair and setting, all its columns from that cell: the widest limit, and of cells
    # whose setting's parameters differ (a code version changed them) the newest. Unstacking keeps
    # a cell whose rate is undefined (no image reached the target) and invents no pair.
    cells = widest_cells(matrix).drop_duplicates(["source_id", "target_id", "attack"], keep="last")
    wide = cells.set_index(["source_id", "target_id", "attack"])[["defense_rate", "n_defended", "n_evaluated"]] \
        .unstack("attack")
    rates = wide["defense_rate"].reindex(columns=list(SETTINGS)) * 100
    for setting in SETTINGS:
        for count in ("defended", "evaluated"):
            rates[f"{setting}_{count}"] = wide[f"n_{count}"].reindex(columns=list(SETTINGS))[setting]
    rates = rates.reset_index()
    rates.columns.name = None
    target = models.loc[rates["target_id"]]
    rows = rates.assign(shallow_ratio=target["shallow_ratio"].to_numpy(), seed=target["seed"].to_numpy(),
                        mask_seed=target["mask_seed"].to_numpy(), width=target["width"].to_numpy(),
                        clean_accuracy=target["clean_accuracy"].to_numpy() * 100)
    return rows[columns].sort_values(["shallow_ratio", "target_id", "source_id"], ignore_index=True)


def fig14_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per shallow ratio and metric: mean and sample standard deviation over seeds (0 for one
    value), and for the defense rates the rate of the counts pooled over the ratio's (source,
    target) pairs with its 95 % Wilson interval.

    Clean accuracy is averaged over distinct target models, defense rates over (source,
    target) pairs. Columns: ``shallow_ratio``, ``metric``, ``mean``, ``std``, ``n``, ``pooled``,
    ``ci_low``, ``ci_high`` (percent; ``pooled`` is ``mean`` and the interval NaN for clean
    accuracy, whose counts the store does not keep).
    """
    parts = []
    for metric in METRICS:
        values = rows.drop_duplicates("target_id") if metric == "clean_accuracy" else rows
        values = values.dropna(subset=[metric])
        grouped = values.groupby("shallow_ratio")
        part = pd.DataFrame({"mean": grouped[metric].mean(), "std": grouped[metric].std(ddof=1).fillna(0.0),
                             "n": grouped.size()})
        if metric == "clean_accuracy":
            part = part.assign(pooled=part["mean"], ci_low=math.nan, ci_high=math.nan)
        else:
            defended, evaluated = grouped[f"{metric}_defended"].sum(), grouped[f"{metric}_evaluated"].sum()
            low, high = wilson(defended, evaluated)
            part = part.assign(pooled=100 * defended / evaluated, ci_low=100 * low, ci_high=100 * high)
        parts.append(part.reset_index().assign(metric=metric))
    summary = pd.concat(parts, ignore_index=True)
    return summary[["shallow_ratio", "metric", "mean", "std", "n", "pooled", "ci_low", "ci_high"]].sort_values(
        ["metric", "shallow_ratio"], ignore_index=True)


def training_scale(store: Store, rows: pd.DataFrame) -> str:
    """How Fig. 14's targets were trained, compared with the paper: ``paper`` (full CIFAR-10,
    width 1, the paper's recipe unchanged), ``shortened`` (the same, with fewer epochs: the
    schedule's steps keep their fractions) or ``demo`` (anything smaller). The paper's numbers
    are comparable to the first, nearly to the second."""
    models = store.models().set_index("model_id").loc[rows["target_id"].unique()]
    scales = set()
    for dataset, width, subset, recipe, config in zip(models["dataset"], models["width"], models["train_subset"],
                                                      models["recipe"], models["config"]):
        overrides = json.loads(config).get("recipe_overrides") or {}
        full = (dataset == "cifar10" or dataset.startswith("folder:cifar10")) and width == 1.0 and pd.isna(subset) \
            and recipe == "paper"
        scales.add("demo" if not full or set(overrides) - {"epochs"} else "shortened" if overrides else "paper")
    for scale in ("demo", "shortened", "paper"):  # the least of them
        if scale in scales:
            return scale
    return "demo"


def fig14_table(summary: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per shallow ratio of ``fig14_summary``'s frame: models, then ``mean ± std``
    (percent) per metric, a defense rate followed by the 95 % Wilson interval of its pooled
    counts in brackets, then the paper's values (``fig14_points()``) when given."""
    wide = summary.pivot(index="shallow_ratio", columns="metric", values=["mean", "std", "n", "ci_low", "ci_high"])
    out = pd.DataFrame(index=wide.index)
    out["models"] = wide[("n", "clean_accuracy")].astype(int)
    names = {"clean_accuracy": "clean acc %", "madry_fgsm": "FGSM defense %", "madry_pgd": "PGD defense %"}
    for metric, name in names.items():
        if ("mean", metric) in wide:
            out[name] = [(f"{m:.2f} ± {s:.2f}" + (f" [{lo:.1f}, {hi:.1f}]" if pd.notna(lo) else "")) if pd.notna(m)
                         else "" for m, s, lo, hi in zip(wide[("mean", metric)], wide[("std", metric)],
                                                         wide[("ci_low", metric)], wide[("ci_high", metric)])]
    if paper is not None:
        for metric, name in names.items():
            values = paper[paper["metric"] == metric].set_index("shallow_ratio")["value"]
            out[f"paper {name.split(' %')[0]}"] = [f"{values[r]:.2f}" if r in values.index else ""
                                                    for r in out.index]
    out.index.name = "shallow ratio"
    return out


def check_png_path(out: str | Path) -> Path:
    """``out`` as a Path; a ``UserError`` unless it names a ``.png`` file."""
    out = Path(out)
    if out.name.lower() == ".png":  # a hidden file: its suffix is empty, and its copies would be .png.svg
        raise UserError(f"the figure needs a name before .png, got {out}")
    if out.suffix.lower() != ".png":
        raise UserError(f"the figure must be a .png file (.svg and .pdf copies are written beside it), got {out}")
    return out


def draw_fig14(summary: pd.DataFrame, out: str | Path, *, rows: pd.DataFrame | None = None,
               paper: pd.DataFrame | None = None, title: str = "") -> pd.DataFrame:
    """Draw Fig. 14 as ``out`` (PNG) and the same name with ``.svg`` and ``.pdf``.

    Args:
        summary: ``fig14_summary``'s frame (percentages).
        out: the PNG path; its directory is created.
        rows: ``fig14_rows``' frame that ``summary`` summarises, for the single pairs' dots.
        paper: the paper's points (``rm_sweep.paper_results.fig14_points()``) to overlay, or None.
        title: the figure's title.

    A defense rate is drawn as the rate of its counts pooled over the ratio's (source, target)
    pairs with the 95 % Wilson interval as its bar, and where a ratio has several pairs (seeds)
    each pair's rate as a small dot; clean accuracy as mean ± std over seeds.

    Returns:
        The points as drawn, read back from the figure: columns ``panel`` (``defense`` or
        ``accuracy``), ``series`` (metric, with ``paper:`` before the paper's, ``pairs:`` before
        the single pairs'), ``x``, ``y``, ``low``, ``high`` (the bar's ends; NaN without a bar).
    """
    out = check_png_path(out)
    figure = Figure(figsize=(10, 4), layout="constrained")
    defense_ax, accuracy_ax = figure.subplots(1, 2)
    panels = {"defense": defense_ax, "accuracy": accuracy_ax}
    for metric in METRICS:
        panel = "accuracy" if metric == "clean_accuracy" else "defense"
        data = summary[summary["metric"] == metric].sort_values("shallow_ratio")
        if len(data) and metric == "clean_accuracy":
            panels[panel].errorbar(data["shallow_ratio"], data["mean"], yerr=data["std"], marker="o", capsize=3,
                                   color=COLORS[metric], label=f"{LABELS[metric]} (this run, ± std)", gid=metric)
        elif len(data):
            bars = [(data["pooled"] - data["ci_low"]).clip(lower=0), (data["ci_high"] - data["pooled"]).clip(lower=0)]
            panels[panel].errorbar(data["shallow_ratio"], data["pooled"], yerr=bars, marker="o", capsize=3,
                                   color=COLORS[metric], label=f"{LABELS[metric]} (this run, 95 % CI)", gid=metric)
            several = rows[rows["shallow_ratio"].isin(data.loc[data["n"] > 1, "shallow_ratio"])] \
                if rows is not None else []
            if len(several):
                panels[panel].plot(several["shallow_ratio"], several[metric], linestyle="none", marker=".",
                                   alpha=0.5, color=COLORS[metric], gid=f"pairs:{metric}")
        if paper is not None:
            points = paper[paper["metric"] == metric].sort_values("shallow_ratio")
            if len(points):
                panels[panel].plot(points["shallow_ratio"], points["value"], linestyle="--", marker="s",
                                   markerfacecolor="none", color=COLORS[metric], label=f"{LABELS[metric]} (paper)",
                                   gid=f"paper:{metric}")
    drawn = _drawn_points(panels)
    for ax in panels.values():
        ax.set_xlabel("shallow drop ratio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    defense_ax.set_ylabel("black-box defense rate (%)")
    defense_ax.set_title("defense against a normal ResNet-18's adversarials")
    accuracy_ax.set_ylabel("clean test accuracy (%)")
    accuracy_ax.set_title("clean accuracy")
    if title:
        figure.suptitle(title)
    # Each file is rendered in memory and renamed into place, so a reader (a browser, a LaTeX
    # build) never sees a half-written figure and an interrupted run leaves the last one whole.
    for path, dpi in ((out, 150), (out.with_suffix(".svg"), None), (out.with_suffix(".pdf"), None)):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=path.suffix[1:].lower(), dpi=dpi)
        atomic_write_bytes(path, buffer.getvalue())
    return drawn


def _drawn_points(panels: dict[str, Any]) -> pd.DataFrame:
    """Every point on the axes, read back from the artists: error-bar series (x, y and the bar's
    ends), the single pairs' dots and the paper's dashed lines (no bar)."""
    points = []
    for panel, ax in panels.items():
        for container in ax.containers:  # errorbar: (data line, caps, (bar collection,))
            line, _, (bars,) = container.lines
            ends = [(bottom[1], top[1]) for bottom, top in bars.get_segments()]
            points += [{"panel": panel, "series": line.get_gid(), "x": float(x), "y": float(y), "low": float(low),
                        "high": float(high)} for x, y, (low, high) in zip(line.get_xdata(), line.get_ydata(), ends)]
        for line in ax.get_lines():
            if (line.get_gid() or "").startswith(("paper:", "pairs:")):
                points += [{"panel": panel, "series": line.get_gid(), "x": float(x), "y": float(y),
                            "low": math.nan, "high": math.nan} for x, y in zip(line.get_xdata(), line.get_ydata())]
    return pd.DataFrame(points, columns=["panel", "series", "x", "y", "low", "high"])


__all__ = ["METRICS", "SETTINGS", "check_png_path", "draw_fig14", "fig14_cells", "fig14_rows", "fig14_summary",
           "fig14_table", "is_fig14_cell", "is_fig14_model", "training_scale"]
