"""The paper's own numbers, shipped with the package for overlays and comparisons.

The CSV files under ``rm_sweep/paper/`` are the paper's result tables as numbers (percentages):

- ``tables8_12_resnet18_targets_blackbox.csv`` (App. F.5): black-box defense rates of ResNet-18
  targets (normal, x-Shallow, y-Deep, both) from five sources; columns ``fgsm_1..3``,
  ``pgd_1..3`` (mapped to setting names by ``rm_sweep.attacks.PAPER_TABLE_COLUMNS``), ``cw``
  (``cw20`` or ``cw40`` by source, ``rm_sweep.report_tables``)
  and the target's clean accuracy ``clean_acc``.
- ``table4_cifar10_pgd_transfer.csv`` / ``table5_mnist_pgd_transfer.csv`` (App. F.2): PGD
  transfer between five architectures.
- ``table1_madry_blackbox.csv`` (Table 1): Madry et al.'s black-box setting (FGSM and PGD at
  eps 8/255) from a normal ResNet-18. The paper's text lost the drop ratio of its "Random
  Mask" row; 0.85 is inferred: that row's FGSM (86.31) equals the 0.85-Shallow row of Tables
  8-12 (``fgsm_1``, the same setting), though its clean accuracy (90.08) differs slightly from
  that row's (90.15).
- ``table6_whitebox.csv`` (App. F.3, Table 6): white-box defense of ResNet-18 normal, 0.5- and
  0.7-Shallow. The paper's text lost the column headers; the columns are our reading
  (``fgsm1``, ``fgsm2``, ``fgsm4``, ``pgd1``, ``pgd2``, ``pgd4``: ``rm_sweep.attacks.settings``
  and ``docs/fidelity.md`` say why).
- ``table7_graybox.csv`` (App. F.4, Table 7): FGSM (``fgsm16``, as its numbers show; the
  authors' script runs ``pgd16``, docs/fidelity.md) defense, one column per source
  (normal, 0.5- and 0.7-Shallow ResNet-18), one row per target. ``relation`` says how a target
  relates to its source: ``other_init`` (same structure and mask, trained separately),
  ``other_mask`` (same drop ratio, another mask, trained separately) or ``transfer`` (another
  architecture, black-box). The text prints each masked target twice without saying which line
  is which kind of gray-box attack; we read them in the order the text introduces the two kinds
  (another initialisation first). The normal target has no mask: ``other_init``.

Models are named as the paper names them (``rm_sweep.spec.paper_label``); ``parse_label`` reads
such a name back.

Fig. 14 of the paper has no table of its own. Its points are assembled from these: clean
accuracy and Madry-FGSM defense per shallow ratio from Tables 8-12 (ResNet-18 source), and
Madry-PGD defense at ratios 0 and 0.85 from Table 1 (Tables 8-12 have no eps-8 PGD column).
"""
from __future__ import annotations

import re
from importlib import resources

import pandas as pd

from rm_sweep.attacks import PAPER_TABLE_COLUMNS
from rm_sweep.spec import ARCH_NAMES

FIG14_METRICS = ("clean_accuracy", "madry_fgsm", "madry_pgd")
_RATIOS = re.compile(r"^(?:(?P<shallow>[0-9.]+)-Shallow)?(?:, )?(?:(?P<deep>[0-9.]+)-Deep)?$")
_ARCHS = {name: arch for arch, name in ARCH_NAMES.items()}


def read_table(name: str) -> pd.DataFrame:
    """One of the packaged CSV files (``name`` without ``.csv``), as the paper prints it."""
    with resources.files("rm_sweep").joinpath("paper", f"{name}.csv").open() as f:
        return pd.read_csv(f)


def tables8_12() -> pd.DataFrame:
    """Tables 8-12 with the target's mask parsed: columns ``source_model``, ``target``,
    ``shallow_ratio``, ``deep_ratio``, one column per attack setting name (``madry_fgsm``,
    ``fgsm16``, ..., ``cw``) and ``clean_acc``; percentages."""
    table = read_table("tables8_12_resnet18_targets_blackbox").rename(columns=PAPER_TABLE_COLUMNS)
    parsed = table["target"].map(parse_label)
    table.insert(2, "shallow_ratio", [p[1] for p in parsed])
    table.insert(3, "deep_ratio", [p[2] for p in parsed])
    return table


def parse_label(label: str, arch: str = "resnet18") -> tuple[str, float, float]:
    """A paper's model name -> (architecture, shallow ratio, deep ratio): ``"Normal ResNet-50"``
    -> ``("resnet50", 0, 0)``, ``"ResNet-18 0.7-Shallow"`` -> ``("resnet18", 0.7, 0)``; a name
    without an architecture (``"0.5-Shallow, 0.5-Deep"``, as Tables 8-12 print) takes ``arch``."""
    text = label.strip()
    if text.startswith("Normal "):
        name = text.removeprefix("Normal ")
        if name not in _ARCHS:
            raise ValueError(f"unrecognised architecture in {label!r}")
        return _ARCHS[name], 0.0, 0.0
    for name, key in _ARCHS.items():
        if text.startswith(name + " "):
            arch, text = key, text.removeprefix(name + " ")
    match = _RATIOS.match(text)
    if match is None or not (match["shallow"] or match["deep"]):
        raise ValueError(f"unrecognised model name {label!r} in the paper's tables")
    return arch, float(match["shallow"] or 0.0), float(match["deep"] or 0.0)


def fig14_points() -> pd.DataFrame:
    """The paper's Fig. 14 points: columns ``shallow_ratio``, ``metric`` (one of
    ``FIG14_METRICS``), ``value`` (percent) and ``reference`` (where the number is printed).

    Shallow-only ResNet-18 targets of a normal ResNet-18 source; see the module docstring for
    which table each metric comes from.
    """
    table = tables8_12()
    rows = table[(table["source_model"] == "resnet18") & (table["deep_ratio"] == 0)]
    points = [
        {"shallow_ratio": r.shallow_ratio, "metric": metric, "value": getattr(r, column), "reference": "Tables 8-12"}
        for r in rows.itertuples()
        for metric, column in (("clean_accuracy", "clean_acc"), ("madry_fgsm", "madry_fgsm"))
    ]
    table1 = read_table("table1_madry_blackbox").dropna(subset=["shallow_ratio"])
    points += [
        {"shallow_ratio": r.shallow_ratio, "metric": "madry_pgd", "value": r.madry_pgd, "reference": "Table 1"}
        for r in table1.itertuples()
    ]
    return pd.DataFrame(points).sort_values(["metric", "shallow_ratio"], ignore_index=True)


__all__ = ["FIG14_METRICS", "fig14_points", "parse_label", "read_table", "tables8_12"]
