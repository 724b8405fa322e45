"""Fig. 14 from the store: the figure is a valid PNG (and SVG) whose points are the stored rows'
means and standard deviations; the table and the paper's overlay say what the figure shows.

The store is built by hand (tiny models trained in-process, cells computed with
rm_sweep.evaluate): nothing is missing, so the command starts no Ray. The end-to-end run (sweep,
matrix, figure, then a rerun from the store) is the slow test at the end.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import scipy.stats

import rm_sweep
from rm_sweep import sweep, tradeoff
from rm_sweep.errors import UserError
from rm_sweep.figures import draw_fig14, fig14_rows, fig14_summary, training_scale
from rm_sweep.leases import Leases, Owner
from rm_sweep.paper_results import fig14_points, read_table, tables8_12
from rm_sweep.spaces import SearchSpace, load_space
from rm_sweep.store import Store
from rm_sweep.tables import MATRIX_GIVEN

from scaffold import run_command
from tinystore import build_filled, space_file, write_tinted_folder

MODELS = [
    {"name": "source", "seed": 0},
    {"name": "normal", "seed": [1, 2]},
    {"name": "shallow", "shallow_ratio": [0.5, 0.9], "seed": [1, 2]},
    {"name": "deep", "deep_ratio": 0.5, "seed": 1},  # not Fig. 14's: must be left out
]
MATRIX = [{"sources": ["source"], "targets": ["normal", "shallow", "deep"], "attacks": ["madry_fgsm", "madry_pgd"],
           "protocols": ["black"]}]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What Ray and Tune print by themselves, kept off the console unless --verbose.
RAY_CHATTER = ["Token authentication", "Configuration for experiment", "TensorBoard", "Trial status",
               "Checkpoint successfully created", "Reporting training result", "Requesting resources",
               "may be a performance bottleneck"]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchSpace, Store, Path]:
    """A store holding every model and matrix cell of a tiny Fig. 14 space."""
    root = tmp_path_factory.mktemp("tradeoff")
    space, store = build_filled(root, root / "data", MODELS, MATRIX)
    return space, store, root


def _expected(store: Store) -> pd.DataFrame:
    """Fig. 14's points computed straight from the stored tables: defense rates as counts pooled
    over a ratio's pairs with their Wilson interval (scipy's), clean accuracy as mean ± std."""
    models = store.models().set_index("model_id")
    matrix = store.matrix()
    matrix = matrix[matrix["target_id"].map(lambda t: models.loc[t, "deep_ratio"] == 0)]
    matrix = matrix.assign(ratio=matrix["target_id"].map(models["shallow_ratio"]))
    out = []
    for (attack, ratio), group in matrix.groupby(["attack", "ratio"]):
        defended, evaluated = int(group["n_defended"].sum()), int(group["n_evaluated"].sum())
        interval = scipy.stats.binomtest(defended, evaluated).proportion_ci(0.95, method="wilson")
        out.append({"series": attack, "x": ratio, "y": 100 * defended / evaluated,
                    "low": 100 * interval.low, "high": 100 * interval.high})
    targets = models.loc[matrix["target_id"].unique()]
    for ratio, group in targets.groupby("shallow_ratio"):
        mean, std = group["clean_accuracy"].mean() * 100, group["clean_accuracy"].std(ddof=1) * 100
        out.append({"series": "clean_accuracy", "x": ratio, "y": mean, "low": mean - std, "high": mean + std})
    return pd.DataFrame(out).sort_values(["series", "x"], ignore_index=True)


def test_figure_points_are_the_stored_rows(filled: tuple[SearchSpace, Store, Path], tmp_path: Path) -> None:
    space, store, _ = filled
    rows = fig14_rows(store, space)
    drawn = draw_fig14(fig14_summary(rows), tmp_path / "fig.png", rows=rows)
    ours = drawn[~drawn["series"].str.contains(":")].sort_values(["series", "x"], ignore_index=True)
    expected = _expected(store)
    assert ours["series"].tolist() == expected["series"].tolist()
    for column in ("x", "y", "low", "high"):
        assert ours[column].tolist() == pytest.approx(expected[column].tolist(), abs=1e-9)
    assert set(ours.loc[ours["series"] == "clean_accuracy", "panel"]) == {"accuracy"}
    assert set(ours.loc[ours["series"] != "clean_accuracy", "panel"]) == {"defense"}
    # Every pair of a ratio with several seeds is a dot of its own, at its own rate.
    pairs = drawn[drawn["series"].str.startswith("pairs:")]
    several = rows[rows.groupby("shallow_ratio")["target_id"].transform("nunique") > 1]
    for setting in ("madry_fgsm", "madry_pgd"):
        dots = pairs[pairs["series"] == f"pairs:{setting}"]
        drawn_dots, stored = sorted(zip(dots["x"], dots["y"])), sorted(zip(several["shallow_ratio"], several[setting]))
        assert [x for x, _ in drawn_dots] == [x for x, _ in stored]
        assert [y for _, y in drawn_dots] == pytest.approx([y for _, y in stored])


def test_redrawing_replaces_each_file_whole(filled: tuple[SearchSpace, Store, Path], tmp_path: Path) -> None:
    """A reader that opened the figures before a redraw still reads the old ones whole (each new
    file is renamed into place, never written over the old), and a link keeps its place."""
    space, store, _ = filled
    summary = fig14_summary(fig14_rows(store, space))
    out = tmp_path / "fig.png"
    draw_fig14(summary, out)
    readers = {p: (p.read_bytes(), p.open("rb")) for p in (out, out.with_suffix(".svg"), out.with_suffix(".pdf"))}
    draw_fig14(summary, out, title="redrawn")
    for path, (before, reader) in readers.items():
        with reader:
            assert reader.read() == before, path
        assert path.read_bytes() != before, path
    link = tmp_path / "link" / "fig.png"
    link.parent.mkdir()
    link.symlink_to(out)
    draw_fig14(summary, link)
    assert link.is_symlink() and link.resolve() == out
    assert not [p.name for p in tmp_path.rglob(".*")]


def test_command_writes_png_and_svg_from_the_store_without_ray(
        filled: tuple[SearchSpace, Store, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space, store, root = filled
    out = tmp_path / "figs" / "fig14.png"
    assert tradeoff.main(["--space", space.path, "--store", store.uri, "--data-dir", str(root / "data"),
                          "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    height, width, _ = matplotlib.image.imread(out).shape
    assert height > 100 and width > 100
    assert out.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    assert out.with_suffix(".pdf").read_bytes().startswith(b"%PDF-")
    assert "Ray not started" in text
    assert "not the accuracy trade-off" in text  # a small space says what it can show
    summary = fig14_summary(fig14_rows(store, space))
    pgd = summary[(summary["metric"] == "madry_pgd") & (summary["shallow_ratio"] == 0.9)].iloc[0]
    assert f"{pgd['mean']:.2f} ± {pgd['std']:.2f}" in text  # the table prints the plotted numbers


def test_dry_run_of_a_full_store_has_nothing_to_do(filled: tuple[SearchSpace, Store, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    space, store, _ = filled
    out = tmp_path / "fig.png"
    assert tradeoff.main(["--space", space.path, "--store", store.uri, "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    models, cells = len(space.models()), len(space.cells)
    assert text.startswith(f"{space.name}: {models} of {models} models and {cells} of {cells} matrix cells in "
                           f"{store.uri}; a run would train 0 model(s) and compute 0 cell(s)")
    assert text.count(" stored") == models + cells and " missing" not in text
    assert not out.exists()


@pytest.mark.parametrize("command", ["sweep", "tradeoff"])
def test_dry_runs_say_why_a_model_is_damaged_and_who_trains_a_missing_one(
        filled: tuple[SearchSpace, Store, Path], tmp_path: Path, capsys: pytest.CaptureFixture, command: str) -> None:
    """Both commands' dry runs list the models the same way: a damaged model with its reason, a
    missing one that another live run has leased with that run."""
    space, store, _ = filled
    copy = Store(shutil.copytree(store.uri, tmp_path / "store"))
    damaged, leased = space.models()[1].model_id, space.models()[2].model_id
    checkpoint = tmp_path / "store" / "checkpoints" / f"{damaged}.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    (tmp_path / "store" / "models" / f"{leased}.parquet").unlink()
    other = Leases(copy.files, Owner.new())
    assert other.acquire(leased) is None  # the other run holds it now
    if command == "sweep":
        assert sweep.main([space.path, "--store", copy.uri, "--dry-run"]) == 0
    else:
        assert tradeoff.main(["--space", space.path, "--store", copy.uri, "--out", str(tmp_path / "f.png"),
                              "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"model {damaged}: its checkpoint is damaged (not a whole torch file); it counts as missing: the next " \
           "sweep trains it again" in lines
    assert f"model {leased}: {other.read(leased).describe()}" in lines
    status = {line.split()[0]: line.split()[-3] for line in lines if line.split() and line.split()[0] in
              (damaged, leased)}
    assert status == {damaged: "damaged", leased: "missing"}


def test_dry_run_of_the_default_space_from_elsewhere_starts_nothing(tmp_path: Path) -> None:
    """The default space is the packaged quick: found from any directory; nothing is written."""
    data = "folder:/anywhere/cifar10-jpeg"
    done = run_command("rm_sweep.tradeoff", "--dry-run", "--data", data, "--store", str(tmp_path / "store"),
                       cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    quick = load_space("quick", data=data)
    models, cells = len(quick.models()), len(quick.cells)
    assert done.stdout.startswith(f"quick: 0 of {models} models and 0 of {cells} matrix cells")
    assert done.stdout.count(" missing") == models + cells and all(s.model_id in done.stdout for s in quick.models())
    assert done.stdout.rstrip().endswith("ray not imported")
    assert list(tmp_path.iterdir()) == []  # no store, no figure


@pytest.mark.parametrize("flag, overlaid", [("auto", False), ("on", True), ("off", False)])
def test_paper_columns_are_printed_only_when_asked_or_comparable(
        filled: tuple[SearchSpace, Store, Path], tmp_path: Path, capsys: pytest.CaptureFixture, flag: str,
        overlaid: bool) -> None:
    space, store, _ = filled
    assert training_scale(store, fig14_rows(store, space)) == "demo"  # width 0.125, a toy data set: "auto" is off
    tradeoff.main(["--space", space.path, "--store", store.uri, "--out", str(tmp_path / "fig.png"), "--paper", flag])
    assert ("paper PGD defense" in capsys.readouterr().out) == overlaid


def test_overlaid_paper_points_are_the_papers(filled: tuple[SearchSpace, Store, Path], tmp_path: Path) -> None:
    space, store, _ = filled
    drawn = draw_fig14(fig14_summary(fig14_rows(store, space)), tmp_path / "fig.png", paper=fig14_points())
    paper = drawn[drawn["series"].str.startswith("paper:")]
    expected = fig14_points()
    assert sorted(zip(paper["series"].str.removeprefix("paper:"), paper["x"], paper["y"])) == sorted(
        zip(expected["metric"], expected["shallow_ratio"], expected["value"]))


def test_only_fig14_targets_are_drawn(filled: tuple[SearchSpace, Store, Path]) -> None:
    space, store, _ = filled
    rows = fig14_rows(store, space)
    assert sorted(rows["shallow_ratio"].unique()) == [0.0, 0.5, 0.9]
    assert len(rows) == 2 + 4  # normal seeds 1, 2 and 0.5/0.9-Shallow seeds 1, 2; the deep model left out


def test_the_store_alone_selects_the_spaces_cells(filled: tuple[SearchSpace, Store, Path], tmp_path: Path) -> None:
    """Without a space (the report), the same rule picks the same cells from the stored models."""
    space, store, _ = filled
    pd.testing.assert_frame_equal(fig14_rows(store), fig14_rows(store, space))
    empty = Store(tmp_path / "empty")
    assert fig14_rows(empty, allow_empty=True).empty
    with pytest.raises(UserError, match="holds no Fig. 14 cells"):
        fig14_rows(empty)


def test_each_pair_is_its_widest_cell_and_only_stored_pairs_are_rows(filled: tuple[SearchSpace, Store, Path],
                                                                      tmp_path: Path) -> None:
    """Read without a space, a store can hold a pair at several limits: the widest cell is the
    pair's, rate and counts alike (a smaller limit's images are among its own), whichever was
    written first. A second source adds its pairs, not every source x target combination."""
    space, store, _ = filled
    shutil.copytree(store.uri, tmp_path / "store", ignore=lambda d, _: ["matrix"] if d == store.uri else [])
    copy = Store(tmp_path / "store")  # its models, no cells yet
    before = fig14_rows(store)
    cells = store.matrix()[[c for c in MATRIX_GIVEN if c in store.matrix().columns]]
    narrower = cells.assign(limit=cells["limit"] // 2, n_defended=0, n_evaluated=0, defense_rate=math.nan)
    normal = before.loc[before["shallow_ratio"] == 0, "target_id"].iloc[0]
    other_source = cells[cells["target_id"] == before["target_id"].iloc[-1]].assign(source_id=normal)
    for written in (narrower, cells, other_source):  # the narrower cells first
        copy.add_matrix([{k: v for k, v in row.items() if not pd.isna(v) or k == "defense_rate"}
                         for row in written.to_dict("records")])
    after = fig14_rows(copy)
    widened = after[after["source_id"] != normal].reset_index(drop=True)
    pd.testing.assert_frame_equal(widened, before)
    assert len(after) == len(before) + 1  # the one new pair


@pytest.mark.parametrize("metric, ratio, value", [
    ("clean_accuracy", 0.0, 95.33), ("clean_accuracy", 0.9, 87.68), ("madry_fgsm", 0.0, 26.99),
    ("madry_fgsm", 0.85, 86.31), ("madry_pgd", 0.0, 7.56), ("madry_pgd", 0.85, 90.30),
])
def test_paper_points_are_the_papers_tables(metric: str, ratio: float, value: float) -> None:
    points = fig14_points()
    (found,) = points[(points["metric"] == metric) & (points["shallow_ratio"] == ratio)]["value"]
    assert found == value


def test_packaged_tables_parse_every_target() -> None:
    table = tables8_12()
    assert len(table) == len(read_table("tables8_12_resnet18_targets_blackbox"))
    both = table[table["target"] == "0.7-Shallow, 0.3-Deep"].iloc[0]
    assert (both["shallow_ratio"], both["deep_ratio"]) == (0.7, 0.3)
    assert not table[["shallow_ratio", "deep_ratio"]].isna().any().any()


def test_bad_output_name_fails_before_any_work(filled: tuple[SearchSpace, Store, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    space, store, _ = filled
    from rm_sweep.errors import cli_main
    with pytest.raises(SystemExit) as exit_info:
        cli_main(tradeoff.main, ["--space", space.path, "--store", str(tmp_path / "empty"), "--out", "fig.jpg"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: the figure must be a .png")
    assert not (tmp_path / "empty").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_end_to_end_then_from_the_store(tmp_path: Path, data_dir: Path, capfd: pytest.CaptureFixture) -> None:
    """Sweep (Ray Tune), matrix (Ray tasks and actors), figure; then the same command from the store.
    The console holds the progress bars and the summary, none of Ray's own chatter."""
    data = write_tinted_folder(tmp_path / "tinted")
    # Two models: one round of two concurrent trials on 2 CPUs (each trial costs ~25 s of Ray start-up).
    space = space_file(tmp_path, data, [{"name": "source", "seed": 0}, {"name": "shallow", "shallow_ratio": 0.5, "seed": 1}],
                       [{"sources": ["source"], "targets": ["shallow"],
                         "attacks": ["madry_fgsm", "madry_pgd"], "protocols": ["black"]}])
    args = ["--space", str(space), "--store", str(tmp_path / "store"), "--data-dir", str(data_dir),
            "--out", str(tmp_path / "fig14.png")]
    assert tradeoff.main(args) == 0
    first = capfd.readouterr()
    assert "2 model(s) trained, 2 matrix cells added" in first.out
    assert "training 2 model(s)" in first.err
    for chatter in RAY_CHATTER:
        assert chatter not in first.out + first.err
    store = Store(tmp_path / "store")
    assert len(store.models()) == 2 and len(store.matrix()) == 2
    # Each row says where and by which code it was made.
    assert set(store.models()["device"]) == set(store.matrix()["device"]) == {"cpu"}
    assert all(v.startswith(rm_sweep.__version__) for v in store.models()["code_version"])
    assert (tmp_path / "fig14.png").read_bytes().startswith(PNG_SIGNATURE)
    assert tradeoff.main(args) == 0
    assert "Ray not started" in capfd.readouterr().out
    assert len(store.matrix()) == 2
    assert not math.isnan(store.matrix()["defense_rate"].sum())


class _StoredModels:
    """Stands in for a store: only its ``models`` table is read."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame

    def models(self) -> pd.DataFrame:
        return self.frame


@pytest.mark.parametrize("dataset, width, subset, recipe, overrides, scale", [
    ("cifar10", 1.0, None, "paper", {}, "paper"),
    ("folder:cifar10-jpeg", 1.0, None, "paper", {}, "paper"),
    ("cifar10", 1.0, None, "paper", {"epochs": 40}, "shortened"),
    ("cifar10", 1.0, None, "paper", {"epochs": 40, "lr": 0.05}, "demo"),
    ("cifar10", 0.25, None, "paper", {}, "demo"),
    ("cifar10", 1.0, 5000, "paper", {}, "demo"),
    ("cifar10", 1.0, None, "quick", {}, "demo"),
    ("mnist", 1.0, None, "paper", {}, "demo"),
])
def test_training_scale_says_how_close_to_the_papers_training(dataset: str, width: float, subset: int | None,
                                                              recipe: str, overrides: dict, scale: str) -> None:
    paper_like = {"dataset": "cifar10", "width": 1.0, "train_subset": None, "recipe": "paper", "config": "{}"}
    this = {"dataset": dataset, "width": width, "train_subset": subset, "recipe": recipe,
            "config": json.dumps({"recipe_overrides": overrides})}
    frame = pd.DataFrame([{"model_id": "a", **paper_like}, {"model_id": "b", **this}])
    assert training_scale(_StoredModels(frame), pd.DataFrame({"target_id": ["a", "b"]})) == scale
    assert training_scale(_StoredModels(frame), pd.DataFrame({"target_id": ["a"]})) == "paper"
