"""The paper's result tables filled from a store: each cell holds the paper's value and ours.

A ``PaperTable`` is one of the paper's tables as data: its rows (targets), its columns (a source
and an attack setting), the paper's numbers, the data set and the protocol. ``paper_tables()``
builds every table the packaged CSVs hold (``rm_sweep.paper_results``): Tables 1, 4, 5, 6, 7 and
8-12. ``fill_tables(store)`` fills those the store has at least one cell of.

How stored facts meet the paper's cells (``_row_selection`` and ``_column_selection``, one rule):
- a stored model is a row's target when its architecture, drop ratios, variant and channel
  multiplier are the row's (the paper's name, ``rm_sweep.spec.paper_label``, prints exactly
  these) and its data set is the table's (``data_family``); width, recipe and seeds are not
  matched, so a small run is compared with the paper as it is (the report lists what it used);
- a column's source is a normal model of the column's architecture (Table 7: of its
  architecture and drop ratio; Table 6, white-box: the target itself);
- Table 7's masked rows tell the two gray-box kinds apart by the mask seeds: the same as the
  source's is another initialisation, another one is another mask.

Several stored cells can make one paper cell (seeds of the source or the target). Ours is then the
pooled rate, defended over evaluated across them, with its 95 % Wilson interval
(``rm_sweep.stats``), and the mean ± sample std of their rates says how much seeds move it. Of
cells that differ only in their image limit the widest is taken (``widest_cells``: its images
include the others'), and a cell with no evaluated image has no rate and is not counted.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rm_sweep.attacks import PAPER_TABLE_COLUMNS
from rm_sweep.paper_results import parse_label, read_table, tables8_12
from rm_sweep.spec import ARCH_NAMES, paper_label
from rm_sweep.stats import widest_cells, wilson
from rm_sweep.store import Store

# Tables 8-12 in the order the paper prints them (the CSV's order): one source each.
TABLES8_12 = {"densenet121": 8, "resnet18": 9, "resnet50": 10, "senet18": 11, "vgg19": 12}
# App. F.5: the CW confidence is 20 for ResNet-18 sources and 40 for the others (VGG-19: no CW).
_CW = {"resnet18": "cw20", "densenet121": "cw40", "resnet50": "cw40", "senet18": "cw40"}
_MODEL_COLUMNS = ["model_id", "architecture", "dataset", "width", "recipe", "shallow_ratio", "deep_ratio",
                  "variant", "channel_multiplier", "mask_seed", "clean_accuracy"]
RELATIONS = {"other_init": "other initialisation", "other_mask": "other mask", "transfer": "transfer"}


def data_family(dataset: str | None) -> str:
    """Which paper data set a stored model's data set stands for: ``mnist`` for MNIST (``mnist``
    or a folder whose name contains "mnist"), ``cifar10`` for every other (CIFAR-10 itself, and
    stand-ins such as a small folder of test images)."""
    return "mnist" if isinstance(dataset, str) and "mnist" in dataset.lower() else "cifar10"


@dataclass(frozen=True)
class Model:
    """A model as the paper names it: architecture, drop ratios, variant, channel multiplier."""

    arch: str
    shallow_ratio: float = 0.0
    deep_ratio: float = 0.0
    variant: str = "random"
    channel_multiplier: float = 1.0

    @classmethod
    def from_label(cls, label: str, arch: str = "resnet18") -> Model:
        """The model a paper name (``parse_label``) describes; ``arch`` where the name has none."""
        arch, shallow, deep = parse_label(label, arch)
        return cls(arch, shallow, deep)

    @property
    def label(self) -> str:
        return paper_label(self.arch, self.shallow_ratio, self.deep_ratio, self.variant, self.channel_multiplier)

    def matches(self, frame: pd.DataFrame, prefix: str) -> np.ndarray:
        """(len(frame),) bool: which rows' model columns (named ``prefix`` + the ``models``
        column) describe this model; rows without a model (NaN) do not."""
        def close(column: str, value: float) -> np.ndarray:  # ratios are floats: 0.7 is 0.7 whatever its last bit
            return np.isclose(frame[prefix + column].to_numpy(dtype=float), value)

        def equal(column: str, value: str) -> np.ndarray:
            return frame[prefix + column].to_numpy() == value

        return (equal("architecture", self.arch) & close("shallow_ratio", self.shallow_ratio)
                & close("deep_ratio", self.deep_ratio) & equal("variant", self.variant)
                & close("channel_multiplier", self.channel_multiplier))


@dataclass(frozen=True)
class Row:
    """A row of a paper table: the target and the paper's values, one per column (NaN where the
    paper has none).

    Attributes:
        label: the paper's name of the row. target: the model it stands for; None for a model
            no store holds (Table 1's adversarially trained network).
        paper: the paper's defense rates in percent, one per column. paper_acc: its clean accuracy.
        relation: Table 7: ``other_init``, ``other_mask`` (masked gray-box targets) or None.
        protocol: the row's protocol when it differs from the table's (Table 7's transfer rows).
    """

    label: str
    target: Model | None
    paper: tuple[float, ...]
    paper_acc: float
    relation: str | None = None
    protocol: str | None = None


@dataclass(frozen=True)
class Column:
    """A column of a paper table: the attack setting and the source (None: the target itself)."""

    label: str
    setting: str
    source: Model | None


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's tables as data; ``key`` (``table4``) names it in files and anchors."""

    key: str
    caption: str
    dataset: str
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    protocol: str = "black"  # of the stored cells that fill it

    @property
    def title(self) -> str:
        """``Table 4`` for key ``table4``: as the paper names it."""
        return "Table " + self.key.removeprefix("table")


@dataclass(frozen=True)
class FilledTable:
    """A paper table with the store's numbers, all in percent.

    Attributes:
        table: the paper's table.
        cells: one row per (row, column) position: ``row``, ``column`` (positions), ``paper``,
            ``ours`` (pooled rate; NaN where the store has no cell), ``ci_low``, ``ci_high``
            (its 95 % Wilson interval), ``mean``, ``std`` (over the stored cells; NaN for fewer
            than two), ``n_cells``, ``n_defended``, ``n_evaluated``.
        accuracy: one row per table row: ``paper``, ``ours`` (mean clean accuracy of the stored
            targets of the row's cells), ``std`` (NaN for fewer than two), ``n_models``.
        models: the stored models the cells come from (``models`` rows, sources and targets).
    """

    table: PaperTable
    cells: pd.DataFrame
    accuracy: pd.DataFrame
    models: pd.DataFrame

    @property
    def filled(self) -> int:
        """Cells of the paper's table that the store fills."""
        return int(self.cells["n_cells"].gt(0).sum())


def _numbers(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _transfer_table(key: str, csv: str, dataset: str, setting: str, caption: str) -> PaperTable:
    """Tables 4 and 5: targets x source architectures, one PGD setting."""
    paper = read_table(csv)
    sources = [c for c in paper.columns if c.startswith("from_")]
    columns = tuple(Column(f"from {ARCH_NAMES[c.removeprefix('from_')]}", setting, Model(c.removeprefix("from_")))
                    for c in sources)
    rows = tuple(Row(r["target"], Model.from_label(r["target"]), _numbers(r[sources]), float(r["clean_acc"]))
                 for _, r in paper.iterrows())
    return PaperTable(key, caption, dataset, rows, columns)


def _table1() -> PaperTable:
    paper = read_table("table1_madry_blackbox")
    settings = ["madry_fgsm", "madry_pgd"]
    rows = tuple(Row(r["model"], Model("resnet18", float(r["shallow_ratio"])) if pd.notna(r["shallow_ratio"]) else None,
                     _numbers(r[settings]), float(r["clean_acc"])) for _, r in paper.iterrows())
    return PaperTable("table1", "Madry et al.'s black-box setting (FGSM and PGD, eps 8/255) from a normal "
                      "ResNet-18, CIFAR-10. Madry's adversarially trained network is not a model rm_sweep trains.",
                      "cifar10", rows, tuple(Column(s, s, Model("resnet18")) for s in settings))


def _table6() -> PaperTable:
    paper = read_table("table6_whitebox")
    settings = ["fgsm1", "fgsm2", "fgsm4", "pgd1", "pgd2", "pgd4"]
    rows = tuple(Row(r["target"], Model.from_label(r["target"]), _numbers(r[settings]), float(r["clean_acc"]))
                 for _, r in paper.iterrows())
    return PaperTable("table6", "White-box: each model attacks itself, FGSM and PGD at eps 1, 2, 4 (/255), "
                      "CIFAR-10 (App. F.3; the column headers are our reading of the text, see docs/fidelity.md).",
                      "cifar10", rows, tuple(Column(s, s, None) for s in settings), "white")


def _table7() -> PaperTable:
    paper = read_table("table7_graybox")
    sources = [c for c in paper.columns if c not in ("target", "relation")]
    rows = []
    for _, r in paper.iterrows():
        target, relation = Model.from_label(r["target"]), r["relation"]
        masked = relation != "transfer" and bool(target.shallow_ratio or target.deep_ratio)
        # A masked gray-box target says which kind it is; the transfers are black-box cells.
        rows.append(Row(f"{r['target']} ({RELATIONS[relation]})" if masked else r["target"], target,
                        _numbers(r[sources]), math.nan, relation if masked else None,
                        "black" if relation == "transfer" else None))
    # The paper does not name the attack; its numbers are FGSM-16's (normal -> normal is Table 9's
    # FGSM-16 cell, 13.91 %), though the authors' gray-box script runs PGD-16 (docs/fidelity.md).
    return PaperTable("table7", "Gray-box FGSM (eps 16/255), CIFAR-10: columns are sources, "
                      "rows targets trained separately (another initialisation, or another mask of the same ratio); "
                      "the last rows are black-box transfers to other architectures (App. F.4).", "cifar10",
                      tuple(rows), tuple(Column(f"from {s}", "fgsm16", Model.from_label(s)) for s in sources), "gray")


def _tables8_12() -> list[PaperTable]:
    paper = tables8_12().rename(columns=PAPER_TABLE_COLUMNS)
    tables = []
    for source, number in TABLES8_12.items():
        part = paper[paper["source_model"] == source]
        settings = list(PAPER_TABLE_COLUMNS.values()) + (["cw"] if source in _CW else [])
        columns = tuple(Column(name, name, Model(source)) for name in (_CW[source] if s == "cw" else s for s in settings))
        rows = tuple(Row(r["target"], Model("resnet18", r["shallow_ratio"], r["deep_ratio"]), _numbers(r[settings]),
                         float(r["clean_acc"])) for _, r in part.iterrows())
        tables.append(PaperTable(f"table{number}", "Black-box defense of ResNet-18 targets against "
                                 f"adversarials from a normal {ARCH_NAMES[source]}, CIFAR-10 (App. F.5).", "cifar10",
                                 rows, columns))
    return tables


def paper_tables() -> list[PaperTable]:
    """Every table the packaged CSVs hold, in the paper's numbering."""
    return [_table1(),
            _transfer_table("table4", "table4_cifar10_pgd_transfer", "cifar10", "pgd16",
                            "PGD (eps 16/255, 20 steps of 1) transfer between architectures, CIFAR-10: rows are "
                            "targets, columns the normal source of each architecture (App. F.2)."),
            _transfer_table("table5", "table5_mnist_pgd_transfer", "mnist", "mnist_pgd",
                            "PGD (eps 0.3, 40 steps of 0.01) transfer between architectures, MNIST (App. F.2)."),
            _table6(), _table7(), *_tables8_12()]


def stored_cells(store: Store) -> pd.DataFrame:
    """The store's matrix cells on single models that have a rate (an evaluated image), the
    widest of each limit (``widest_cells``), each with its target's and its source's ``models``
    columns (prefixed ``target_`` and ``source_``; NaN where the source is no model) and the data
    set family (``target_family``)."""
    matrix = store.matrix()
    models = store.models()[_MODEL_COLUMNS]
    models = models.assign(family=models["dataset"].map(data_family))
    cells = widest_cells(matrix[matrix["target_kind"] == "model"])
    cells = cells[cells["n_evaluated"] > 0]
    cells = cells.merge(models.add_prefix("target_"), left_on="target_id", right_on="target_model_id")
    return cells.merge(models.add_prefix("source_"), left_on="source_id", right_on="source_model_id", how="left")


# The matching rule of the module docstring, in two halves: a stored cell makes the paper's cell
# (row, column) when it is in both the row's selection and the column's.
def _row_selection(cells: pd.DataFrame, table: PaperTable, row: Row) -> np.ndarray:
    """(len(cells),) bool: cells of the row's target (and Table 7's relation) under its protocol."""
    if row.target is None:
        return np.zeros(len(cells), dtype=bool)
    keep = ((cells["protocol"].to_numpy() == (row.protocol or table.protocol))
            & (cells["target_family"].to_numpy() == table.dataset) & row.target.matches(cells, "target_"))
    if row.relation is not None:
        same_mask = cells["source_mask_seed"].to_numpy() == cells["target_mask_seed"].to_numpy()
        keep &= same_mask if row.relation == "other_init" else ~same_mask
    return keep


def _column_selection(cells: pd.DataFrame, column: Column) -> np.ndarray:
    """(len(cells),) bool: cells of the column's setting and source (None: the target itself)."""
    keep = cells["attack"].to_numpy() == column.setting
    if column.source is None:
        return keep & (cells["source_id"].to_numpy() == cells["target_id"].to_numpy())
    return keep & column.source.matches(cells, "source_")


def _rates(found: pd.DataFrame) -> dict[str, float]:
    """Pooled rate, its Wilson interval, and mean ± std of the single rates, in percent."""
    defended, evaluated = int(found["n_defended"].sum()), int(found["n_evaluated"].sum())
    low, high = wilson(defended, evaluated)
    rates = found["n_defended"] / found["n_evaluated"] * 100  # stored_cells: never 0
    several = len(found) > 1
    return {"ours": defended / evaluated * 100 if evaluated else math.nan, "ci_low": float(low) * 100,
            "ci_high": float(high) * 100, "mean": rates.mean() if several else math.nan,
            "std": rates.std(ddof=1) if several else math.nan, "n_cells": len(found), "n_defended": defended,
            "n_evaluated": evaluated}


def fill(table: PaperTable, cells: pd.DataFrame, models: pd.DataFrame) -> FilledTable:
    """``table`` with the numbers of ``cells`` (``stored_cells``' frame); ``models`` is the
    store's ``models`` table."""
    out, accuracy, used = [], [], set()
    clean_accuracy = models.set_index("model_id")["clean_accuracy"] * 100
    columns = [_column_selection(cells, c) for c in table.columns]
    for i, row in enumerate(table.rows):
        targets = set()
        selected = _row_selection(cells, table, row)
        for j, in_column in enumerate(columns):
            found = cells[selected & in_column]
            targets |= set(found["target_id"])
            used |= targets | set(found["source_id"])
            out.append({"row": i, "column": j, "paper": row.paper[j], **_rates(found)})
        clean = clean_accuracy.loc[sorted(targets)]
        accuracy.append({"row": i, "paper": row.paper_acc, "ours": clean.mean() if len(clean) else math.nan,
                         "std": clean.std(ddof=1) if len(clean) > 1 else math.nan, "n_models": len(clean)})
    in_table = models[models["model_id"].isin(used)].reset_index(drop=True)
    return FilledTable(table, pd.DataFrame(out), pd.DataFrame(accuracy), in_table)


def fill_tables(store: Store) -> list[FilledTable]:
    """Every paper table the store has at least one cell of, in the paper's numbering."""
    cells, models = stored_cells(store), store.models()
    filled = [fill(t, cells, models) for t in paper_tables()]
    return [f for f in filled if f.filled]


__all__ = ["RELATIONS", "TABLES8_12", "Column", "FilledTable", "Model", "PaperTable", "Row", "data_family", "fill",
           "fill_tables", "paper_tables", "stored_cells"]
