"""Queries of a store built by hand (untrained models, matrix rows with chosen counts): listing,
filters, the paper's pivot layout, the output formats and SQL, in Python and on the command line."""
from __future__ import annotations

import io
import math
import re
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import scipy.stats

from rm_sweep import formats, query, sql_engine
from rm_sweep.attacks import get_setting
from rm_sweep.data import load_dataset
from rm_sweep.errors import UserError, cli_main
from rm_sweep.masks import MaskConfig
from rm_sweep.spec import EnsembleSpec, ModelSpec, canonical_json
from rm_sweep.store import Store

from tinystore import write_tinted_folder

PGD = {"attack": "pgd", "eps_255": 8, "step_255": 2, "steps": 7, "random_start": False, "quantise": True}


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two normal sources (seeds 0, 3), targets: normal (seed 1), 0.7-Shallow, 0.5-Shallow SM, a
    2-member 0.5-Shallow ensemble; madry_pgd black cells with n_defended = 10 * (target number + 1)
    + source number of 100 evaluated, and one noise cell."""
    root = tmp_path_factory.mktemp("query")
    folder = write_tinted_folder(root / "tinted", train=4, test=2)
    data = load_dataset(f"folder:{folder}", data_dir=root / "data")

    def spec(train_seed: int, **mask: object) -> ModelSpec:
        return ModelSpec("resnet18", f"folder:{folder}", width=0.125, seed=train_seed, mask=MaskConfig(**mask),
                         recipe="quick")

    sources = [spec(0), spec(3)]
    targets = [spec(1), spec(1, shallow_ratio=0.7), spec(1, shallow_ratio=0.5, variant="same")]
    members = tuple(spec(1, shallow_ratio=0.5, seed=mask_seed) for mask_seed in (0, 1))
    store = Store(root / "store")
    accuracy = {}
    for i, s in enumerate([*sources, *targets, *members]):
        accuracy[s.model_id] = 0.5 + i / 100
        store.add_model(s, {"clean_accuracy": accuracy[s.model_id], "epochs": 1}, s.create(data))
    ensemble = EnsembleSpec(members)
    store.add_ensemble(ensemble)
    target_ids = [*(t.model_id for t in targets), ensemble.ensemble_id]
    rows = []
    for j, source in enumerate(sources):
        for i, target in enumerate(target_ids):
            rows.append({"protocol": "black", "source_id": source.model_id, "target_id": target,
                         "target_kind": "ensemble" if target == ensemble.ensemble_id else "model",
                         "attack": "madry_pgd", "attack_params": canonical_json(PGD), "limit": 1000,
                         "n_crafted": 200, "n_fooled_source": 150, "n_evaluated": 100,
                         "n_defended": 10 * (i + 1) + j, "defense_rate": (10 * (i + 1) + j) / 100})
    rows.append({"protocol": "noise", "source_id": None, "target_id": targets[0].model_id, "target_kind": "model",
                 "attack": "noise", "attack_params": canonical_json({"sigma_255": 8}), "limit": 1000,
                 "n_crafted": 1000, "n_fooled_source": None, "n_evaluated": 500, "n_defended": 450,
                 "defense_rate": 0.9})
    assert store.add_matrix(rows) == 9
    return {"store": store, "sources": sources, "targets": targets, "ensemble": ensemble, "accuracy": accuracy}


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(query.main, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_listing_counts_every_table(known: dict, capsys: pytest.CaptureFixture) -> None:
    listing = query.tables(known["store"])
    assert dict(zip(listing["table"], listing["rows"])) == {"models": 7, "matrix": 9, "ensembles": 1}
    code, out, _ = _run(["--store", known["store"].uri], capsys)
    assert code == 0 and out.splitlines()[1].startswith("matrix (9 rows): protocol, source_id, target_id")


@pytest.mark.parametrize("where, expected", [
    (["shallow_ratio=0.7"], 1),
    (["shallow_ratio=0.5"], 3),  # the SM model and both ensemble members
    (["shallow_ratio=0.5", "variant=same"], 1),
    (["seed>=1", "shallow_ratio=0"], 2),  # the normal target and the seed-3 source
    (["seed!=1"], 2),
    (["clean_accuracy>0.55"], 1),  # accuracies are 0.50 ... 0.56 in order of adding
])
def test_where_filters_models_by_typed_values(known: dict, where: list[str], expected: int) -> None:
    assert len(query.table(known["store"], "models", where)) == expected


def test_where_null_matches_missing_sources(known: dict) -> None:
    noise = query.table(known["store"], "matrix", ["source_id=null"], columns=["attack", "defense_rate"])
    assert noise.to_dict("records") == [{"attack": "noise", "defense_rate": 0.9}]


def test_pivot_is_the_papers_layout(known: dict) -> None:
    grid = query.pivot(known["store"], "madry_pgd")
    assert grid.index.tolist() == ["Normal ResNet-18 (seed 1)", "ResNet-18 0.5-Shallow SM", "ResNet-18 0.7-Shallow",
                                   "ResNet-18 0.5-Shallow EN"]
    assert grid.columns.tolist() == ["from Normal ResNet-18 (seed 0)", "from Normal ResNet-18 (seed 3)", "Acc"]
    # n_defended = 10 * (target number + 1) + source number, of 100: the rate in percent.
    assert grid.iloc[:, 0].tolist() == [10.0, 30.0, 20.0, 40.0]
    assert grid.iloc[:, 1].tolist() == [11.0, 31.0, 21.0, 41.0]
    accuracy = known["accuracy"]
    normal, shallow07, same = (t.model_id for t in known["targets"])
    assert grid["Acc"].tolist()[:3] == pytest.approx([accuracy[normal] * 100, accuracy[same] * 100,
                                                       accuracy[shallow07] * 100])
    assert pd.isna(grid["Acc"].iloc[3])  # an ensemble has no single clean accuracy row


def test_pivot_by_ids_and_counts(known: dict) -> None:
    grid = query.pivot(known["store"], "madry_pgd", value="n_defended", ids=True)
    source = known["sources"][1].model_id
    assert grid.loc[known["ensemble"].ensemble_id, source] == 41


def test_every_defense_rate_comes_with_its_wilson_interval(known: dict) -> None:
    """query's matrix, the pivot and SQL give the same 95 % interval, scipy's Wilson interval of
    the row's counts."""
    matrix = query.table(known["store"], "matrix")
    for row in matrix.itertuples():
        if row.n_evaluated:
            interval = scipy.stats.binomtest(int(row.n_defended), int(row.n_evaluated)).proportion_ci(method="wilson")
            assert (row.ci_low, row.ci_high) == pytest.approx((interval.low, interval.high))
            assert row.ci_low <= row.defense_rate <= row.ci_high
    source = known["sources"][1].model_id
    low = query.pivot(known["store"], "madry_pgd", value="ci_low", ids=True)
    cell = matrix[(matrix.attack == "madry_pgd") & (matrix.source_id == source)
                  & (matrix.target_id == known["ensemble"].ensemble_id)].iloc[0]
    assert low.loc[known["ensemble"].ensemble_id, source] == pytest.approx(100 * cell.ci_low, abs=0.01)
    by_sql = query.sql(known["store"], "SELECT source_id, target_id, attack, attack_params, ci_low, ci_high FROM matrix")
    merged = matrix.merge(by_sql, on=["source_id", "target_id", "attack", "attack_params"], suffixes=("", "_sql"))
    assert len(merged) == len(matrix)
    assert merged["ci_low_sql"].tolist() == pytest.approx(merged["ci_low"].tolist(), nan_ok=True)
    assert merged["ci_high_sql"].tolist() == pytest.approx(merged["ci_high"].tolist(), nan_ok=True)


def test_pivot_of_noise_has_one_column_per_level(known: dict) -> None:
    grid = query.pivot(known["store"], "noise", protocol="noise")
    assert grid.columns.tolist() == ["sigma 8/255", "Acc"] and grid.iloc[0, 0] == 90.0


def test_parameter_columns_are_in_numeric_order_and_named(known: dict, tmp_path: Path) -> None:
    shutil.copytree(known["store"].uri, tmp_path / "store")
    store = Store(tmp_path / "store")
    target = known["targets"][0].model_id
    cell = {"source_id": None, "target_id": target, "target_kind": "model", "limit": 1000, "n_crafted": 10,
            "n_fooled_source": None, "n_evaluated": 10, "n_defended": 5, "defense_rate": 0.5}
    store.add_matrix([{**cell, "protocol": "noise", "attack": "noise", "attack_params": canonical_json({"sigma_255": s})}
                      for s in (16, 4)]
                     + [{**cell, "protocol": "query", "attack": "square8", "median_queries": 30.0,
                         "attack_params": canonical_json(get_setting("square8").params())}])
    noise = query.pivot(store, "noise", protocol="noise")
    assert noise.columns.tolist() == ["sigma 4/255", "sigma 8/255", "sigma 16/255", "Acc"]  # not as text: 16 < 4 < 8
    square = query.pivot(store, "square8", protocol="query")
    assert square.columns.tolist() == ["1000 queries", "Acc"] and square.iloc[0, 0] == 50.0


@pytest.mark.parametrize("fmt", ["csv", "markdown", "latex", "table"])
def test_cli_pivot_formats_show_the_same_numbers(known: dict, capsys: pytest.CaptureFixture, fmt: str) -> None:
    code, out, _ = _run(["--store", known["store"].uri, "pivot", "--setting", "madry_pgd", "--format", fmt], capsys)
    assert code == 0
    if fmt == "csv":
        back = pd.read_csv(io.StringIO(out), index_col=0)
        grid = query.pivot(known["store"], "madry_pgd")
        assert back.index.tolist() == grid.index.tolist()
        assert back.iloc[:, :2].values.tolist() == grid.iloc[:, :2].values.tolist()
    elif fmt == "markdown":
        lines = out.splitlines()
        assert lines[0].startswith("| target ") and set(lines[1]) <= {"|", "-", ":"}
        assert [c.strip() for c in lines[2].split("|")[1:4]] == ["Normal ResNet-18 (seed 1)", "10", "11"]
    elif fmt == "latex":
        header, rows = _tabular(out)
        assert header == ["target", "from Normal ResNet-18 (seed 0)", "from Normal ResNet-18 (seed 3)", "Acc"]
        assert [r[:3] for r in rows] == [["Normal ResNet-18 (seed 1)", "10", "11"], ["ResNet-18 0.5-Shallow SM", "30", "31"],
                                         ["ResNet-18 0.7-Shallow", "20", "21"], ["ResNet-18 0.5-Shallow EN", "40", "41"]]
        assert rows[3][3] == ""  # an ensemble's accuracy is blank, not "nan"
    else:
        assert "ResNet-18 0.5-Shallow EN" in out and "41.0" in out


def _tabular(text: str) -> tuple[list[str], list[list[str]]]:
    """A booktabs ``tabular`` parsed back: its header and rows as cells, checking its frame (the
    column spec has one letter per column, every row as many cells, text escaped)."""
    lines = text.strip().splitlines()
    spec = re.fullmatch(r"\\begin\{tabular\}\{([lrc]+)\}", lines[0])
    assert spec and lines[1] == r"\toprule" and lines[3] == r"\midrule" and lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
    body = [lines[2], *lines[4:-2]]
    assert all(line.endswith(r" \\") for line in body)
    cells = [[c.strip() for c in line[:-3].split(" & ")] for line in body]
    assert {len(c) for c in cells} == {len(spec.group(1))}
    return cells[0], cells[1:]


def test_latex_escapes_text_and_lists() -> None:
    frame = pd.DataFrame({"model_id": ["a_1", "b&c"], "members": [["x_1", "y"], None], "rate": [0.5, float("nan")]})
    header, rows = _tabular(formats.to_latex(frame))
    assert header == [r"model\_id", "members", "rate"]
    assert rows == [[r"a\_1", r"['x\_1', 'y']", "0.5"], [r"b\&c", "", ""]]


def test_cli_table_as_latex(known: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(["--store", known["store"].uri, "models", "--columns", "model_id,seed,clean_accuracy",
                         "--where", "seed=1", "--format", "latex"], capsys)
    assert code == 0 and out.startswith("\\begin{tabular}{lrr}")
    header, rows = _tabular(out)
    assert header == [r"model\_id", "seed", r"clean\_accuracy"] and len(rows) == 5 and {r[1] for r in rows} == {"1"}


def test_markdown_is_exact() -> None:
    frame = pd.DataFrame({"name": ["a", "bb"], "rate": [1.5, float("nan")]})
    assert formats.to_markdown(frame) == "| name | rate |\n|------|-----:|\n| a    |  1.5 |\n| bb   |      |"


def test_cli_parquet_round_trips(known: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "models.parquet"
    code, _, _ = _run(["--store", known["store"].uri, "models", "--where", "seed=1", "--format", "parquet",
                       "--out", str(out)], capsys)
    assert code == 0
    back = pd.read_parquet(out)
    assert sorted(back["model_id"]) == sorted(query.table(known["store"], "models", ["seed=1"])["model_id"])


@pytest.fixture(params=["local", "s3"])
def either(known: dict, request: pytest.FixtureRequest) -> Store:
    """The known store as it is, or copied onto the moto S3 server: SQL reads both alike."""
    if request.param == "local":
        return known["store"]
    remote = Store(request.getfixturevalue("s3_uri"))
    pafs.copy_files(known["store"].path(), remote.path(), source_filesystem=known["store"].filesystem,
                    destination_filesystem=remote.filesystem)
    return remote


def test_sql_over_all_tables(either: Store, capsys: pytest.CaptureFixture) -> None:
    frame = query.sql(either, "SELECT target_kind, SUM(n_defended) AS defended FROM matrix "
                              "WHERE protocol = 'black' GROUP BY target_kind ORDER BY target_kind")
    assert frame.to_dict("records") == [{"target_kind": "ensemble", "defended": 81},
                                        {"target_kind": "model", "defended": 10 + 11 + 20 + 21 + 30 + 31}]
    code, out, _ = _run(["--store", either.uri, "--sql", "SELECT COUNT(*) AS n FROM models", "--format", "csv"], capsys)
    assert (code, out) == (0, "n\n7\n")


def test_sql_mean_std_and_median_over_seeds(either: Store, known: dict) -> None:
    frame = query.sql(either, "SELECT shallow_ratio, count(*) AS n, avg(clean_accuracy) AS mean, "
                              "stddev(clean_accuracy) AS std, median(clean_accuracy) AS median "
                              "FROM models GROUP BY shallow_ratio ORDER BY shallow_ratio")
    expected = known["store"].models().groupby("shallow_ratio")["clean_accuracy"].agg(["count", "mean", "std", "median"])
    assert frame["shallow_ratio"].tolist() == expected.index.tolist() == [0.0, 0.5, 0.7]
    assert frame["n"].tolist() == expected["count"].tolist() == [3, 3, 1]
    for column in ("mean", "std", "median"):  # std over seeds: the sample standard deviation, as pandas'
        assert frame[column].tolist() == pytest.approx(expected[column].tolist(), nan_ok=True)


def test_sql_aggregates_skip_undefined_rates_as_pandas_does(known: dict, tmp_path: Path) -> None:
    """A cell with no evaluated image has no rate (stored as NaN): SQL sees NULL, which its
    aggregates skip, not a NaN that would make every average over it NaN."""
    shutil.copytree(known["store"].uri, tmp_path / "store")
    store = Store(tmp_path / "store")
    source, (target, *_) = known["sources"][0], known["targets"]
    params = canonical_json(get_setting("pgd16").params())
    store.add_matrix([{"protocol": "black", "source_id": s.model_id, "target_id": target.model_id,
                       "target_kind": "model", "attack": "pgd16", "attack_params": params, "limit": 1000,
                       "n_crafted": 10, "n_fooled_source": 5, "n_evaluated": evaluated, "n_defended": defended,
                       "defense_rate": defended / evaluated if evaluated else math.nan}
                      for s, defended, evaluated in ((source, 0, 0), (known["sources"][1], 30, 100))])
    frame = query.sql(store, "SELECT avg(defense_rate) AS mean, max(defense_rate) AS top, count(defense_rate) AS n, "
                             "count_if(defense_rate IS NULL) AS undefined FROM matrix WHERE attack = 'pgd16'")
    expected = query.table(store, "matrix", ["attack=pgd16"])["defense_rate"]
    assert frame.to_dict("records") == [{"mean": expected.mean(), "top": expected.max(), "n": expected.count(),
                                         "undefined": 1}]
    assert (expected.mean(), expected.count()) == (0.3, 1)


def test_sql_pivot_is_the_matrix_pivot(either: Store, known: dict) -> None:
    frame = query.sql(either, "PIVOT (SELECT target_id, source_id, defense_rate FROM matrix WHERE protocol = 'black') "
                              "ON source_id USING first(defense_rate) GROUP BY target_id ORDER BY target_id")
    grid = query.pivot(known["store"], "madry_pgd", ids=True).drop(columns="Acc").sort_index()
    assert frame["target_id"].tolist() == grid.index.tolist()
    assert sorted(frame.columns[1:]) == sorted(grid.columns) == sorted(s.model_id for s in known["sources"])
    for source in grid.columns:
        assert (frame[source] * 100).tolist() == pytest.approx(grid[source].tolist())


def test_sql_keeps_lists_and_timestamps(known: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    store, ensemble = known["store"], known["ensemble"]
    types = query.sql(store, "SELECT typeof(members) AS members, typeof(created_at) AS created_at, "
                             "len(members) AS n FROM ensembles")
    assert types.to_dict("records") == [{"members": "VARCHAR[]", "created_at": "TIMESTAMP WITH TIME ZONE", "n": 2}]
    frame = query.sql(store, "SELECT ensemble_id, members, created_at FROM ensembles")
    assert sorted(frame["members"].iloc[0]) == ensemble.member_ids
    assert str(frame["created_at"].dtype) == "datetime64[us, UTC]"
    assert frame["created_at"].iloc[0] == store.ensembles()["created_at"].iloc[0]
    unnested = query.sql(store, "SELECT unnest(members) AS member FROM ensembles ORDER BY member")
    assert unnested["member"].tolist() == ensemble.member_ids
    out = tmp_path / "ensembles.parquet"
    code, _, _ = _run(["--store", store.uri, "--sql", "SELECT members, created_at FROM ensembles",
                       "--format", "parquet", "--out", str(out)], capsys)
    schema = pq.read_schema(out)
    assert code == 0 and str(schema.field("members").type) in ("list<element: string>", "list<item: string>")
    assert str(schema.field("created_at").type) == "timestamp[us, tz=UTC]"


@pytest.mark.parametrize("statement, reason", [
    ("ATTACH '{tmp}/other.db' AS other", "disabled by configuration"),
    ("COPY models TO '{tmp}/models.csv'", "disabled by configuration"),
    ("COPY (SELECT * FROM matrix) TO '{tmp}/matrix.parquet' (FORMAT parquet)", "disabled by configuration"),
    ("VACUUM INTO '{tmp}/copy.db'", "syntax error"),
    ("EXPORT DATABASE '{tmp}/export'", "disabled by configuration"),
    ("SELECT * FROM read_csv('{tmp}/secret.csv')", "disabled by configuration"),
    ("SELECT * FROM '{tmp}/secret.csv'", "disabled by configuration"),
    ("SELECT * FROM read_text('/etc/passwd')", "disabled by configuration"),
    ("INSTALL httpfs", "disabled by configuration"),
    ("LOAD httpfs", "disabled through configuration"),
    ("SET enable_external_access = true", "configuration has been locked"),
    ("SET temp_directory = '{tmp}/spill'", "configuration has been locked"),
    ("RESET lock_configuration", "configuration has been locked"),
])
def test_sql_reaches_nothing_but_the_tables(known: dict, capsys: pytest.CaptureFixture, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, statement: str, reason: str) -> None:
    (tmp_path / "secret.csv").write_text("password\nhunter2\n")
    monkeypatch.chdir(tmp_path)  # where DuckDB would put relative files (its .tmp spill directory)
    code, out, err = _run(["--store", known["store"].uri, "--sql", statement.format(tmp=tmp_path)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: SQL: ") and reason in err
    assert [p.name for p in tmp_path.iterdir()] == ["secret.csv"]  # nothing written, here or anywhere named


def test_sql_sees_no_python_variables_and_cannot_spill(known: dict) -> None:
    secret = pd.DataFrame({"password": ["hunter2"]})  # noqa: F841  (DuckDB finds it by name)
    assert duckdb.connect().sql("SELECT * FROM secret").fetchall() == [("hunter2",)]  # what DuckDB does by default
    connection = sql_engine.connect(known["store"])
    try:
        with pytest.raises(duckdb.CatalogException, match="secret does not exist"):
            connection.sql("SELECT * FROM secret")
    finally:
        connection.close()
    settings = query.sql(known["store"], "SELECT current_setting('temp_directory') AS spill, "
                                         "current_setting('enable_external_access') AS external")
    assert settings.to_dict("records") == [{"spill": "", "external": False}]
    with pytest.raises(UserError, match="^SQL: Catalog Error: Table with name nope does not exist! Did you mean"):
        query.sql(known["store"], "SELECT * FROM nope")


@pytest.mark.parametrize("argv, message", [
    (["widgets"], "invalid choice"),
    (["models", "--where", "colour=red"], "no column 'colour'"),
    (["models", "--where", "seed=abc"], "column is numeric"),
    (["models", "--where", "seed~1"], "expected COLUMN=VALUE"),
    (["pivot"], "pivot needs --setting"),
    (["pivot", "--setting", "cw40"], "no black cells for cw40"),
    (["--sql", "SELECT nope FROM models"], 'SQL: Binder Error: Referenced column "nope" not found'),
    (["models", "--format", "parquet"], "binary"),
])
def test_bad_queries_exit_2_naming_the_problem(known: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                        argv: list[str], message: str) -> None:
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    code, _, err = _run(["--store", known["store"].uri, *argv], capsys)
    assert code == 2 and message in err.strip().splitlines()[-1]


def test_missing_store_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(["--store", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and err.startswith("error: no store at")
