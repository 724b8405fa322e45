"""The attack matrix as heatmaps: one per (protocol, attack setting), targets x sources.

Each grid is ``rm_sweep.query.pivot``'s (the paper's layout, the store's labels and order), with
the widest of cells that differ only in their limit (a white-box grid is one column: each model
against itself); colour is the defense rate (0-100 %, one scale for
every heatmap, so two of them compare at a glance) and each cell has its value written in it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from rm_sweep.protocols import PROTOCOLS
from rm_sweep.query import pivot
from rm_sweep.store import Store

CMAP = "viridis"  # perceptually uniform and readable in grey and by colour-blind readers


def heatmap_pairs(store: Store) -> list[tuple[str, str]]:
    """The (protocol, attack) pairs the store's matrix holds, in the protocol registry's order;
    rows of no known protocol or no attack name (written by another tool) have no heatmap."""
    matrix = store.matrix()
    order = {name: i for i, name in enumerate(PROTOCOLS)}
    pairs = {(p, a) for p, a in zip(matrix["protocol"], matrix["attack"]) if p in order and isinstance(a, str)}
    return sorted(pairs, key=lambda p: (order[p[0]], p[1]))


def column_label(protocol: str) -> str:
    """What a heatmap's columns are: sources for the protocols that craft, else perturbations."""
    return "source" if PROTOCOLS[protocol].crafts else "perturbation"


def heatmap_grid(store: Store, protocol: str, attack: str) -> pd.DataFrame:
    """Targets x sources (or perturbation levels) of one pair: defense rate in percent. A
    white-box grid (each model attacked with its own gradients) is its diagonal: one column."""
    grid = pivot(store, attack, protocol=protocol, pool=True).drop(columns="Acc")
    if PROTOCOLS[protocol].source == "self":
        return pd.DataFrame({"against itself": [grid.loc[t, f"from {t}"] for t in grid.index]}, index=grid.index)
    return grid


def draw_heatmap(grid: pd.DataFrame, title: str, xlabel: str) -> Figure:
    """``grid`` (percent, NaN where a pair has no cell) as a heatmap with each value written in
    its cell, columns labelled ``xlabel``; sized to the grid so labels stay readable."""
    values = grid.to_numpy(dtype=float)
    rows, columns = values.shape
    figure = Figure(figsize=(max(5.0, 3.2 + 1.1 * columns), max(2.4, 1.4 + 0.42 * rows)), layout="constrained")
    ax = figure.subplots()
    cmap = colormaps[CMAP].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        # Dark text on the light end of the scale, white on the dark end.
        colour = "black" if np.isnan(value) or value > 60 else "white"
        ax.text(j, i, "-" if np.isnan(value) else f"{value:.1f}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(columns), [str(c) for c in grid.columns], rotation=25, ha="right", fontsize=8)
    ax.set_yticks(range(rows), [str(i) for i in grid.index], fontsize=8)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("target", fontsize=9)
    ax.set_title(title, fontsize=10)
    figure.colorbar(image, ax=ax, label="defense rate (%)", shrink=0.9)
    return figure


__all__ = ["column_label", "draw_heatmap", "heatmap_grid", "heatmap_pairs"]
