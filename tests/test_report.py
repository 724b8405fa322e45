"""The report: paper tables hold the paper's numbers and the store's, the heatmaps are the matrix,
the gallery shows the models' own predictions, the page needs no other file, bad input is one line.

Two stores: one built by hand (untrained models, matrix rows with chosen counts, as
tests/test_query.py does), whose numbers the tables must reproduce; one of tiny trained models
(tests/tinystore.py) for the gallery and the browser, where adversarials must really fool.
"""
from __future__ import annotations

import math
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rm_sweep import report
from rm_sweep.attacks import get_setting
from rm_sweep.data import load_dataset
from rm_sweep.errors import UserError, cli_main
from rm_sweep.evaluate import predict
from rm_sweep.gallery import make_gallery
from rm_sweep.heatmaps import heatmap_grid
from rm_sweep.masks import MaskConfig
from rm_sweep.paper_results import parse_label, read_table
from rm_sweep.query import pivot
from rm_sweep.report_render import cell_text
from rm_sweep.report_tables import fill_tables
from rm_sweep.spec import ARCH_NAMES, ModelSpec, canonical_json, paper_label
from rm_sweep.stats import wilson
from rm_sweep.store import Store

from scaffold import run_command
from tinystore import build_filled, write_tinted_folder

# name: (architecture, training seed, shallow ratio, mask seed)
MODELS = {"src0": ("resnet18", 0, 0.0, 0), "src3": ("resnet18", 3, 0.0, 0), "normal": ("resnet18", 1, 0.0, 0),
          "half_a": ("resnet18", 1, 0.5, 0), "half_b": ("resnet18", 2, 0.5, 0), "half_mask": ("resnet18", 4, 0.5, 1),
          "vgg": ("vgg19", 1, 0.0, 0)}
# (protocol, source, target, setting, limit, defended, evaluated)
CELLS = [
    ("black", "src0", "normal", "madry_fgsm", 1000, 30, 100),
    ("black", "src3", "normal", "madry_fgsm", 1000, 20, 100),
    ("black", "src0", "half_a", "madry_fgsm", 1000, 60, 100),
    # A smaller limit: its images are among the limit-1000 cell's, which alone counts (60 %, not 100/150).
    ("black", "src0", "half_a", "madry_fgsm", 500, 40, 50),
    ("black", "src0", "half_mask", "madry_fgsm", 1000, 0, 0),  # no image evaluated: no rate, not counted
    ("black", "src0", "normal", "madry_pgd", 1000, 0, 0),  # Table 1's cell: it stays empty
    ("black", "src0", "half_b", "madry_fgsm", 1000, 70, 120),
    ("gray", "src0", "half_a", "fgsm16", 1000, 40, 80),  # same mask seed as the source: another initialisation
    ("gray", "src0", "half_mask", "fgsm16", 1000, 20, 50),  # another mask
    ("gray", "src0", "half_mask", "pgd16", 1000, 5, 50),  # the authors' script's attack: not Table 7's
    ("black", "src0", "vgg", "pgd16", 1000, 10, 40),  # Table 4's
    ("black", "src0", "vgg", "fgsm16", 1000, 12, 40),  # Table 7's
    ("white", "half_a", "half_a", "fgsm1", 1000, 90, 100),
]


def _handmade(root: Path, cells: list[tuple]) -> Store:
    """A store of untrained width-0.125 models with ``cells`` as its matrix (accuracy 0.5 + i/100)."""
    folder = write_tinted_folder(root / "tinted", train=4, test=2)
    data = load_dataset(f"folder:{folder}", data_dir=root / "data")
    store = Store(root / "store")
    ids = {}
    for i, (name, (arch, seed, shallow, mask_seed)) in enumerate(MODELS.items()):
        spec = ModelSpec(arch, f"folder:{folder}", width=0.125, seed=seed, recipe="quick",
                         mask=MaskConfig(shallow_ratio=shallow, seed=mask_seed))
        store.add_model(spec, {"clean_accuracy": 0.5 + i / 100, "epochs": 1}, spec.create(data))
        ids[name] = spec.model_id
    rows = [{"protocol": protocol, "source_id": ids[source], "target_id": ids[target], "target_kind": "model",
             "attack": setting, "attack_params": canonical_json(get_setting(setting).params()), "limit": limit,
             "n_crafted": evaluated + 10, "n_fooled_source": evaluated + 5, "n_evaluated": evaluated,
             "n_defended": defended, "defense_rate": defended / evaluated if evaluated else math.nan}
            for protocol, source, target, setting, limit, defended, evaluated in cells]
    store.add_matrix(rows)
    return store


@pytest.fixture(scope="module")
def handmade(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return _handmade(tmp_path_factory.mktemp("handmade"), CELLS)


def _cell(filled, row_label: str, column_label: str) -> pd.Series:
    table = filled.table
    i = [r.label for r in table.rows].index(row_label)
    j = [c.label for c in table.columns].index(column_label)
    return filled.cells.set_index(["row", "column"]).loc[(i, j)]


def _expected(counts: list[tuple[int, int]]) -> dict[str, float]:
    """Pooled rate, Wilson interval, mean and std (percent) of (defended, evaluated) pairs."""
    defended, evaluated = sum(d for d, _ in counts), sum(n for _, n in counts)
    low, high = wilson(defended, evaluated)
    rates = [d / n * 100 for d, n in counts]
    return {"ours": defended / evaluated * 100, "ci_low": float(low) * 100, "ci_high": float(high) * 100,
            "mean": float(np.mean(rates)) if len(rates) > 1 else math.nan,
            "std": float(np.std(rates, ddof=1)) if len(rates) > 1 else math.nan, "n_cells": len(counts)}


# Each table's numbers as the packaged CSV prints them (rows in order, the table's columns).
_PAPER = {
    "Table 1": lambda: read_table("table1_madry_blackbox")[["madry_fgsm", "madry_pgd"]],
    "Table 4": lambda: read_table("table4_cifar10_pgd_transfer").filter(like="from_"),
    "Table 6": lambda: read_table("table6_whitebox").drop(columns=["target", "clean_acc"]),
    "Table 7": lambda: read_table("table7_graybox").drop(columns=["target", "relation"]),
    "Table 9": lambda: read_table("tables8_12_resnet18_targets_blackbox").query("source_model == 'resnet18'")
    [["fgsm_1", "fgsm_2", "fgsm_3", "pgd_1", "pgd_2", "pgd_3", "cw"]],
}


def test_tables_appear_when_the_store_has_one_of_their_cells(handmade: Store) -> None:
    assert [f.table.title for f in fill_tables(handmade)] == list(_PAPER)  # no MNIST, no other source


@pytest.mark.parametrize("title", list(_PAPER))
def test_paper_values_are_the_csvs(handmade: Store, title: str) -> None:
    (filled,) = [f for f in fill_tables(handmade) if f.table.title == title]
    paper = _PAPER[title]().to_numpy(dtype=float)
    grid = filled.cells.pivot(index="row", columns="column", values="paper").to_numpy()
    np.testing.assert_array_equal(grid, paper)


@pytest.mark.parametrize("title, row, column, counts", [
    ("Table 9", "Normal ResNet-18", "madry_fgsm", [(30, 100), (20, 100)]),  # two sources' seeds
    ("Table 9", "0.5-Shallow", "madry_fgsm", [(60, 100), (70, 120)]),  # the widest limit, two target seeds
    ("Table 1", "Normal ResNet-18", "madry_fgsm", [(30, 100), (20, 100)]),
    ("Table 4", "Normal VGG-19", "from ResNet-18", [(10, 40)]),
    ("Table 7", "Normal VGG-19", "from Normal ResNet-18", [(12, 40)]),
    ("Table 7", "ResNet-18 0.5-Shallow (other initialisation)", "from Normal ResNet-18", [(40, 80)]),
    ("Table 7", "ResNet-18 0.5-Shallow (other mask)", "from Normal ResNet-18", [(20, 50)]),
    ("Table 6", "ResNet-18 0.5-Shallow", "fgsm1", [(90, 100)]),
])
def test_our_values_are_the_stores(handmade: Store, title: str, row: str, column: str, counts: list) -> None:
    (filled,) = [f for f in fill_tables(handmade) if f.table.title == title]
    cell = _cell(filled, row, column)
    for key, value in _expected(counts).items():
        assert cell[key] == pytest.approx(value, nan_ok=True), key
    assert cell["n_defended"] == sum(d for d, _ in counts) and cell["n_evaluated"] == sum(n for _, n in counts)


def test_cells_the_store_lacks_show_the_papers_value_and_a_dash(handmade: Store) -> None:
    (table9,) = [f for f in fill_tables(handmade) if f.table.title == "Table 9"]
    cell = _cell(table9, "0.7-Deep", "pgd32")
    assert cell["n_cells"] == 0 and math.isnan(cell["ours"])
    assert cell_text(cell) == "1.31 / -"
    (table1,) = [f for f in fill_tables(handmade) if f.table.title == "Table 1"]
    assert cell_text(_cell(table1, "Vanilla (Madry)", "madry_pgd")) == "86.00 / -"  # no store holds Madry's model


def test_accuracy_is_the_mean_over_the_rows_targets(handmade: Store) -> None:
    (table9,) = [f for f in fill_tables(handmade) if f.table.title == "Table 9"]
    accuracy = table9.accuracy.iloc[[r.label for r in table9.table.rows].index("0.5-Shallow")]
    # The 0.5-Shallow targets of the madry_fgsm cells: half_a and half_b, clean accuracy 0.5 + i/100.
    clean = [50 + list(MODELS).index(name) for name in ("half_a", "half_b")]
    assert (accuracy["paper"], accuracy["n_models"]) == (93.39, 2)
    assert accuracy["ours"] == pytest.approx(np.mean(clean)) and accuracy["std"] == pytest.approx(np.std(clean, ddof=1))


def test_cells_without_an_evaluated_image_are_not_filled(handmade: Store) -> None:
    (table1,) = [f for f in fill_tables(handmade) if f.table.title == "Table 1"]
    cell = _cell(table1, "Normal ResNet-18", "madry_pgd")
    assert cell["n_cells"] == 0 and math.isnan(cell["ours"]) and cell_text(cell) == "7.56 / -"
    assert table1.filled == int((table1.cells["n_evaluated"] > 0).sum())


def test_heatmap_takes_the_widest_limit(handmade: Store) -> None:
    grid = heatmap_grid(handmade, "black", "madry_fgsm")
    assert grid.loc["ResNet-18 0.5-Shallow (seed 1, mask seed 0)", "from Normal ResNet-18 (seed 0)"] == 60.0  # 60/100
    with pytest.raises(UserError, match="several madry_fgsm cells"):
        pivot(handmade, "madry_fgsm")  # the query command still refuses to mix limits silently


def test_white_box_heatmap_is_one_column(handmade: Store) -> None:
    grid = heatmap_grid(handmade, "white", "fgsm1")
    assert grid.columns.tolist() == ["against itself"] and grid.iloc[0, 0] == 90.0


@pytest.mark.parametrize("arch", sorted(ARCH_NAMES))
@pytest.mark.parametrize("shallow, deep", [(0.0, 0.0), (0.7, 0.0), (0.0, 0.5), (0.3, 0.7)])
def test_paper_names_read_back(arch: str, shallow: float, deep: float) -> None:
    assert parse_label(paper_label(arch, shallow, deep, "random", 1.0)) == (arch, shallow, deep)


@pytest.mark.parametrize("csv, first", [("table6_whitebox", 1), ("table7_graybox", 2)])
def test_transcribed_tables_are_the_papers_text(csv: str, first: int) -> None:
    """Every row of Tables 6 and 7 as the paper's text prints it (``a | b% | ...``)."""
    text = Path(__file__).resolve().parents[2] / "shared" / "paper" / "random_mask.txt"
    if not text.exists():
        pytest.skip(f"{text} is not available")
    lines = {line.replace(" ", "").rstrip("|") for line in text.read_text().splitlines()}
    for row in read_table(csv).itertuples(index=False):
        values = "|".join(f"{v:.2f}%" for v in row[first:] if not math.isnan(v))
        assert any(line.endswith(values) for line in lines), values


class _Links(HTMLParser):
    """Every tag and every src/href value of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[tuple[str, str]] = []
        self.alts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.links += [(tag, value or "") for name, value in attrs if name in ("src", "href")]
        self.alts += [value or "" for name, value in attrs if tag == "img" and name == "alt"]


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(report.main, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def handmade_report(handmade: Store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert report.main(["--store", handmade.uri, "--out", str(out)]) == 0
    return out


def test_page_is_self_contained(handmade_report: Path) -> None:
    page = _Links()
    page.feed(handmade_report.read_text())
    assert page.links and all(v.startswith("data:image/png;base64,") if t == "img" else v.startswith("#")
                              for t, v in page.links), [v[:40] for _, v in page.links]
    assert not {"link", "script", "iframe", "object", "embed"} & set(page.tags)
    assert "url(" not in handmade_report.read_text()  # no CSS fetches either


def test_one_heatmap_per_protocol_and_setting(handmade: Store, handmade_report: Path) -> None:
    page = _Links()
    page.feed(handmade_report.read_text())
    heatmaps = [a.removeprefix("heatmap of ") for a in page.alts if a.startswith("heatmap of ")]
    pairs = {f"{p}: {a}" for p, a in zip(handmade.matrix()["protocol"], handmade.matrix()["attack"])}
    assert sorted(heatmaps) == sorted(pairs)
    figures = handmade_report.with_name("report_figures")
    assert len(list(figures.glob("heatmap_*.pdf"))) == len(pairs)


def test_markdown_and_latex_hold_the_same_tables(handmade: Store, handmade_report: Path) -> None:
    markdown = handmade_report.with_suffix(".md").read_text()
    latex = handmade_report.with_name("report_tables.tex").read_text()
    (table9,) = [f for f in fill_tables(handmade) if f.table.title == "Table 9"]
    text = cell_text(_cell(table9, "0.5-Shallow", "madry_fgsm"))
    assert text.startswith("59.66 / 59.09 [52.5, 65.4] (-0.57); 59.17 ± 1.18 over 2")
    assert text in markdown and text.replace("±", r"$\pm$") in latex
    assert latex.count(r"\begin{tabular}") == len(_PAPER)
    for title in _PAPER:
        assert f"## {title} (paper vs ours)" in markdown


def test_a_new_report_replaces_each_figure_whole(handmade: Store, tmp_path: Path) -> None:
    """Figures are renamed into place one by one: a figure a reader opened before the new report
    still reads whole, a figure that is a link keeps its place, and no temporary file is left."""
    out = tmp_path / "report.html"
    assert report.main(["--store", handmade.uri, "--out", str(out)]) == 0
    first, second = sorted((tmp_path / "report_figures").glob("heatmap_*.png"))[:2]
    before = first.read_bytes()
    elsewhere = tmp_path / "kept" / second.name
    elsewhere.parent.mkdir()
    second.rename(elsewhere)
    second.symlink_to(elsewhere)
    with first.open("rb") as reader:
        assert report.main(["--store", handmade.uri, "--out", str(out)]) == 0
        assert first.stat().st_ino != os.fstat(reader.fileno()).st_ino
        assert reader.read() == before
    assert second.is_symlink() and second.resolve() == elsewhere
    assert elsewhere.read_bytes().startswith(b"\x89PNG")
    assert not [p.name for p in tmp_path.rglob(".*")]


def test_the_report_lists_each_directory_of_the_store_once(handmade: Store, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every heatmap and paper table reads the same tables: on S3 each listing is a request, so
    a report of six heatmaps lists each table once, not once per question."""
    store = Store(handmade.uri)
    listed: list[str] = []
    listing = store.files.listing
    monkeypatch.setattr(store.files, "listing", lambda directory: listed.append(directory) or listing(directory))
    built = report.build(store, tmp_path / "figures")
    assert built.heatmaps >= 4 and len(built.tables) == len(_PAPER)
    assert sorted(listed) == sorted(set(listed)) and len(listed) == 3, listed


def test_rows_another_tool_wrote_with_odd_values_draw_nothing_and_break_nothing(handmade: Store,
                                                                                  tmp_path: Path) -> None:
    """Files of the tables' columns and types whose values no rm_sweep run writes (an unknown or
    missing protocol or attack, a model without a data set): the report leaves them out."""
    shutil.copytree(handmade.uri, tmp_path / "store")
    store = Store(tmp_path / "store")
    cells = store.arrow("matrix").slice(0, 3)
    odd = pa.table({"protocol": ["bogus", None, "black"], "attack": ["madry_fgsm", "madry_fgsm", None]})
    for name in odd.column_names:
        cells = cells.set_column(cells.schema.get_field_index(name), name, odd[name])
    pq.write_table(cells, tmp_path / "store" / "matrix" / "foreign.parquet")
    model = store.arrow("models").slice(0, 1)
    model = model.set_column(model.schema.get_field_index("model_id"), "model_id", pa.array(["f" * 16]))
    model = model.set_column(model.schema.get_field_index("dataset"), "dataset", pa.nulls(1, pa.string()))
    pq.write_table(model, tmp_path / "store" / "models" / "foreign.parquet")
    built, expected = report.build(store, tmp_path / "figures"), report.build(handmade, tmp_path / "expected")
    assert (built.heatmaps, built.tables) == (expected.heatmaps, expected.tables)


def test_without_fig14_cells_the_section_says_so(tmp_path: Path) -> None:
    """As a user runs it: a store without Fig. 14 cells still renders, and Ray is never imported."""
    store = _handmade(tmp_path, [c for c in CELLS if c[0] == "white"])
    out = tmp_path / "r.html"
    done = run_command("rm_sweep.report", "--store", store.uri, "--out", str(out), "--data",
                       f"folder:{tmp_path / 'tinted'}", "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    assert "Fig. 14 not in the store; 1 paper table(s) (Table 6); 1 heatmap(s)" in done.stdout
    assert done.stdout.splitlines()[-1] == "ray not imported"
    page = out.read_text()
    assert "The store holds no Fig. 14 cells" in page
    assert "The store has no black-box cells whose source was trained on this data set" in page


def test_without_data_the_gallery_says_how_to_get_it(handmade_report: Path) -> None:
    assert "rerun with --data SPEC" in handmade_report.read_text()
    assert "## Galleries (Fig. 1, Fig. 12)\n\nThe galleries craft" in handmade_report.with_suffix(".md").read_text()


@pytest.mark.parametrize("out, message", [
    ("{tmp}", "is a directory"),
    ("{tmp}/report.txt", "must name an .html file"),
])
def test_bad_out_is_one_line(handmade: Store, tmp_path: Path, capsys: pytest.CaptureFixture, out: str,
                             message: str) -> None:
    code, _, err = _run(["--store", handmade.uri, "--out", out.format(tmp=tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err


def test_missing_store_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(["--store", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 2 and err.strip() == f"error: no store at {tmp_path / 'nowhere'} " \
                                         "(run python -m rm_sweep.tradeoff or rm_sweep.sweep first)"
    assert not (tmp_path / "r.html").exists()


# -- a store of trained models: the gallery, and the page in a browser --------------------------------
TRAINED = [{"name": "source", "seed": 0}, {"name": "normal", "seed": 1}, {"name": "masked", "shallow_ratio": 0.7,
                                                                          "seed": 1}]
TRAINED_MATRIX = [{"sources": ["source"], "targets": ["normal", "masked"], "attacks": ["madry_pgd"],
                   "protocols": ["black"]}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Path]:
    """Tiny trained ResNet-18s (a normal source, a normal and a 0.7-Shallow target) and their cells."""
    root = tmp_path_factory.mktemp("trained")
    _, store = build_filled(root, root / "data", TRAINED, TRAINED_MATRIX, epochs=4)
    return store, root


def test_gallery_predictions_are_the_models(trained: tuple[Store, Path]) -> None:
    store, root = trained
    gallery = make_gallery(store, f"folder:{root / 'tinted'}", root / "data", n=4)
    models = {i: store.load_model(i) for i, _ in (*gallery.sources, *gallery.targets)}
    (source_id, _), = gallery.sources
    assert [name.split(" (")[0] for _, name in gallery.targets] == ["Normal ResNet-18", "ResNet-18 0.7-Shallow"]
    assert gallery.setting == "madry_pgd" and len(gallery.rows) == 4
    data = load_dataset(f"folder:{root / 'tinted'}", data_dir=root / "data")
    for row in gallery.rows:
        clean = row.clean.image
        assert torch.equal(clean, data.test_x[row.test_index]) and row.label == int(data.test_y[row.test_index])
        for shot in (row.clean, *row.adversarial):
            if shot.image is None:
                continue
            expected = [int(predict(models[t], shot.image[None])[0]) for t, _ in gallery.targets]
            assert list(shot.predictions) == expected
        assert all(p == row.label for p in row.clean.predictions)  # images every model gets right
        (adversarial,) = row.adversarial
        if adversarial.image is not None:  # an adversarial fools its source, within eps 8/255
            assert int(predict(models[source_id], adversarial.image[None])[0]) != row.label
            assert (adversarial.image.int() - clean.int()).abs().max() <= 8
    assert any(row.adversarial[0].image is not None for row in gallery.rows)  # the checks above ran


def test_gallery_needs_the_models_data(trained: tuple[Store, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    store, _ = trained
    other = write_tinted_folder(tmp_path / "elsewhere", train=4, test=2)
    code, _, err = _run(["--store", store.uri, "--out", str(tmp_path / "r.html"), "--data", f"folder:{other}",
                         "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 2 and "is not a data set the store's models were trained on (folder:tinted)" in err


@pytest.fixture(scope="module")
def trained_report(trained: tuple[Store, Path]) -> Path:
    store, root = trained
    out = root / "out" / "report.html"
    assert report.main(["--store", store.uri, "--out", str(out), "--data", f"folder:{root / 'tinted'}",
                        "--data-dir", str(root / "data"), "--images", "3"]) == 0
    return out


def test_report_with_data_shows_the_gallery(trained_report: Path) -> None:
    page = _Links()
    page.feed(trained_report.read_text())
    assert sum(a.startswith("clean test image") for a in page.alts) == 3
    assert (trained_report.parent / "report_figures" / "gallery.pdf").read_bytes().startswith(b"%PDF-")
    assert (trained_report.parent / "report_figures" / "fig14.pdf").read_bytes().startswith(b"%PDF-")


@pytest.mark.browser
def test_page_renders_in_headless_chromium(trained_report: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image loads and the console stays clean in a real browser (Debian's Chromium)."""
    from browser import chromium_page, skip_without_chromium

    skip_without_chromium()
    with chromium_page(trained_report, tmp_path / "profile", monkeypatch) as (driver, console):
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
        assert len(images) > 5
        assert all(complete and width > 0 for _, complete, width in images), images
        assert driver.title.startswith("rm_sweep report")
        assert not [entry for entry in console() if entry["level"] == "SEVERE"]

