"""A store as groups of researchers leave it: copied files, foreign and damaged files, deleted
checkpoints, files written under every umask, directories nobody may write, unreachable S3
endpoints. Readers count each fact once and name every file they cannot use in one line; nothing
is lost or half-written. No Ray, no training (untrained tiny models)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rm_sweep import query
from rm_sweep.atomic import atomic_write_bytes
from rm_sweep.data import load_dataset
from rm_sweep.errors import UserError
from rm_sweep.masks import MaskConfig
from rm_sweep.spaces import load_space
from rm_sweep.spec import EnsembleSpec
from rm_sweep.storage import Storage
from rm_sweep.store import NOT_STORED, Store
from rm_sweep.tables import ADDED_LATER, MATRIX_SCHEMA, MODELS_SCHEMA, TABLES
from rm_sweep.uris import GCS_RETRY_SECONDS

from scaffold import DUMMY_AWS, ROOT, closed_port, run_command, without_file_override
from tinystore import add_models, matrix_rows, metrics, space_file, spec, tiny_data, write_tinted_folder


@pytest.fixture
def filled(store_uri: str) -> tuple[Store, list]:
    """A store (local and on S3) with 3 models, an ensemble and 3 matrix cells."""
    store = Store(store_uri)
    added = add_models(store, 3)
    store.add_ensemble(EnsembleSpec(tuple(s for s, _ in added[:2])))
    store.add_matrix(matrix_rows("s", ["a", "b", "c"]))
    return store, added


def _copy(store: Store, table: str, suffix: str = " (copy)") -> str:
    """Copy the table's first file within the store, as a file manager does."""
    source = store.path(table, sorted(i.base_name for i in store.filesystem.get_file_info(
        pafs.FileSelector(store.path(table))))[0])
    target = source.replace(".parquet", f"{suffix}.parquet")
    store.filesystem.copy_file(source, target)
    return target


def test_a_copied_file_is_one_fact_for_every_reader(filled: tuple[Store, list]) -> None:
    store, _ = filled
    before = {t: getattr(store, t)() for t in ("models", "matrix", "ensembles")}
    for table in before:
        _copy(store, table)
    fresh = Store(store.uri)
    for table, frame in before.items():
        assert len(getattr(fresh, table)()) == len(frame) == fresh.arrow(table).num_rows, table
        assert query.sql(fresh, f"SELECT COUNT(*) AS n FROM {table}")["n"][0] == len(frame)
        assert len(query.table(fresh, table)) == len(frame)
    assert len(fresh.matrix_keys()) == 3


def _write_foreign(store: Store, table: str, columns: dict) -> str:
    path = store.path(table, "foreign.parquet")
    with store.filesystem.open_output_stream(path) as f:
        pq.write_table(pa.table(columns), f)
    return path


def _models_with(**replaced: pa.Array) -> dict:
    """A one-row ``models`` file with every column, some replaced."""
    row = {f.name: pa.array([None], f.type) for f in MODELS_SCHEMA}
    row["model_id"] = pa.array(["f" * 16])
    return {**row, **replaced}


@pytest.mark.parametrize("table, columns, problem", [
    ("models", {"name": pa.array(["x"]), "seed": pa.array([1.5])}, "lacks column(s) model_id, architecture, width"),
    ("models", _models_with(seed=pa.array([1.0])), "column seed is double, not int64"),
    ("matrix", {**{f.name: pa.array([None], f.type) for f in MATRIX_SCHEMA}, "n_defended": pa.array(["ten"])},
     "column n_defended is string, not int64"),
    ("ensembles", {"ensemble_id": pa.array(["e"])}, "lacks column(s) members"),
])
def test_a_foreign_file_is_named_in_one_line(filled: tuple[Store, list], table: str, columns: dict,
                                             problem: str) -> None:
    store, _ = filled
    path = _write_foreign(store, table, columns)
    with pytest.raises(UserError) as info:
        getattr(Store(store.uri), table)()
    message = str(info.value)
    assert "\n" not in message and problem in message and path.split("/", 1)[-1] in message
    assert f"is not a {table} file" in message and "move it out of the store" in message


@pytest.mark.parametrize("table", ["models", "matrix"])
def test_an_older_file_without_later_columns_is_read_with_them_empty(tmp_path: Path, table: str) -> None:
    store = Store(tmp_path)
    if table == "models":
        add_models(store, 1)
    else:
        store.add_matrix(matrix_rows("s", ["a"]))
    later = ADDED_LATER[table]
    assert later  # else this test tests nothing
    (path,) = (tmp_path / table).iterdir()
    pq.write_table(pq.read_table(path).select([n for n in TABLES[table].names if n not in later]), path)
    rows = getattr(Store(tmp_path), table)()
    assert len(rows) == 1 and list(rows.columns) == TABLES[table].names
    assert rows[list(later)].isna().all().all()


def test_a_file_written_by_pandas_with_nanosecond_times_is_read(tmp_path: Path) -> None:
    """pandas writes timestamps in nanoseconds: read as the table's microseconds, the digits
    below them cut, not an error for every reader."""
    store = Store(tmp_path)
    store.add_matrix(matrix_rows("s", ["a"]))
    (path,) = (tmp_path / "matrix").iterdir()
    table = pq.read_table(path)
    when = pa.array([1_600_000_000_123_456_789], pa.timestamp("ns", tz="UTC"))
    pq.write_table(table.set_column(table.schema.get_field_index("created_at"), "created_at", when), path)
    rows = Store(tmp_path).matrix()
    assert rows["created_at"].tolist() == [pd.Timestamp(1_600_000_000_123_456_000, tz="UTC")]
    assert query.sql(Store(tmp_path), "SELECT count(*) AS n FROM matrix")["n"][0] == 1


def test_a_model_whose_checkpoint_is_gone_or_damaged_counts_as_missing(filled: tuple[Store, list]) -> None:
    store, added = filled
    (gone, _), (cut, _), (kept, _) = added
    store.filesystem.delete_file(store.path("checkpoints", f"{gone.model_id}.pt"))
    data = store.read_checkpoint_bytes(cut.model_id)
    with store.filesystem.open_output_stream(store.path("checkpoints", f"{cut.model_id}.pt")) as f:
        f.write(data[: len(data) // 2])  # a half-copied file
    fresh = Store(store.uri)
    specs = [gone, cut, kept]
    assert fresh.missing(specs) == [gone, cut]
    assert fresh.unusable([s.model_id for s in specs] + ["0" * 16]) == {
        gone.model_id: "its checkpoint is missing", cut.model_id: "its checkpoint is damaged (not a whole torch file)",
        "0" * 16: NOT_STORED}
    with pytest.raises(UserError, match=f"no checkpoint for model {gone.model_id}; it counts as missing"):
        fresh.load_model(gone.model_id)


def test_has_model_is_the_unusable_rule_for_one_model_without_listing_the_store(
        filled: tuple[Store, list], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every trial asks ``has_model``: it must agree with ``unusable`` (a deleted, a cut and an
    empty checkpoint, a kept model, an unknown id) yet never list the store's directories."""
    store, added = filled
    (gone, _), (cut, _), (kept, _) = added
    empty = spec(mask=MaskConfig(shallow_ratio=0.5, seed=7))
    store.add_model(empty, metrics(), empty.create(tiny_data()))
    store.filesystem.delete_file(store.path("checkpoints", f"{gone.model_id}.pt"))
    data = store.read_checkpoint_bytes(cut.model_id)
    with store.filesystem.open_output_stream(store.path("checkpoints", f"{cut.model_id}.pt")) as f:
        f.write(data[: len(data) // 2])
    with store.filesystem.open_output_stream(store.path("checkpoints", f"{empty.model_id}.pt")):
        pass
    ids = [gone.model_id, cut.model_id, empty.model_id, kept.model_id, "0" * 16]
    unusable = Store(store.uri).unusable(ids)
    assert set(unusable) == set(ids) - {kept.model_id}
    fresh = Store(store.uri)
    monkeypatch.setattr(fresh.files, "listing", lambda directory: pytest.fail(f"has_model listed {directory}"))
    assert [fresh.has_model(m) for m in ids] == [m not in unusable for m in ids]


def test_a_snapshot_lists_each_table_once_and_sees_its_own_writes(
        filled: tuple[Store, list], monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside ``snapshot`` the tables are listed once however often they are read (the report
    reads them for every heatmap); a write through the same ``Store`` shows at once, another
    process's write after the snapshot ends."""
    store, _ = filled
    fresh, other = Store(store.uri), Store(store.uri)
    listed: list[str] = []
    listing = fresh.files.listing
    monkeypatch.setattr(fresh.files, "listing", lambda directory: listed.append(directory) or listing(directory))
    with fresh.snapshot():
        for _ in range(3):
            frames = fresh.models(), fresh.matrix(), fresh.ensembles(), query.pivot(fresh, "madry_pgd")
        assert len(listed) == len(set(listed)) == 3 and len(frames[1]) == 3
        other.add_matrix(matrix_rows("s", ["d"]))
        assert len(fresh.matrix()) == 3  # the snapshot's view
        fresh.add_matrix(matrix_rows("s", ["e"]))
        assert set(fresh.matrix()["target_id"]) == {"a", "b", "c", "d", "e"}  # its own write: listed again
    assert len(fresh.matrix()) == 5


def test_the_sweep_names_each_model_that_counts_as_missing(tmp_path: Path) -> None:
    """``sweep --dry-run`` over a store whose checkpoint of one model was deleted and another's
    cut short: one line per such model, and both listed as damaged (no Ray: a dry run)."""
    folder = write_tinted_folder(tmp_path / "tinted", train=4, test=2)
    space = load_space(space_file(tmp_path, folder, [{"name": "m", "seed": [0, 1, 2]}], [], epochs=1))
    data = load_dataset(space.data, data_dir=tmp_path / "cache")
    store = Store(tmp_path / "store")
    for model in space.models():
        store.add_model(model, metrics(), model.create(data))
    gone, cut, kept = (s.model_id for s in space.models())
    (tmp_path / "store" / "checkpoints" / f"{gone}.pt").unlink()
    path = tmp_path / "store" / "checkpoints" / f"{cut}.pt"
    path.write_bytes(path.read_bytes()[:100])
    proc = run_command("rm_sweep.sweep", str(tmp_path / "tiny.yaml"), "--store", str(tmp_path / "store"), "--dry-run",
                       env={"RM_SWEEP_DATA_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"tiny: 1 of 3 models in {tmp_path / 'store'}"
    assert f"model {gone}: its checkpoint is missing; it counts as missing: the next sweep trains it again" in lines
    assert f"model {cut}: its checkpoint is damaged (not a whole torch file); it counts as missing: the next sweep " \
           "trains it again" in lines
    status = {line.split()[0]: line.split()[-3] for line in lines if line.split()[0] in (gone, cut, kept)}
    assert status == {gone: "damaged", cut: "damaged", kept: "stored"}


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_files_get_the_mode_the_umask_gives(tmp_path: Path, umask: int, mode: int) -> None:
    """tempfile.mkstemp creates files 0600; a group's store must stay readable by the group."""
    old = os.umask(umask)
    try:
        store = Store(tmp_path / "store")
        add_models(store, 1)
        store.add_matrix(matrix_rows("s", ["a"]))
        atomic_write_bytes(tmp_path / "plain", b"x")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 4 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {mode}
    dirs = [p for p in (tmp_path / "store").rglob("*") if p.is_dir()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in dirs} == {0o777 & ~umask}


def test_an_unreadable_file_is_named_and_not_to_be_deleted(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    (spec, _), = add_models(store, 1)
    row = tmp_path / "store" / "models" / f"{spec.model_id}.parquet"
    row.chmod(0o000)  # as a file written 0600 by another member of the group looks to this one
    proc = run_command("rm_sweep.query", "models", "--store", str(tmp_path / "store"), wrap=without_file_override)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: cannot read store file {row}: Permission denied")
    assert "chmod g+r" in proc.stderr and "delet" not in proc.stderr and "move it out" not in proc.stderr
    assert row.exists()


def test_the_writable_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    Store(tmp_path / "a" / "b").check_writable()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "ro").mkdir(mode=0o555)
    probe = "from rm_sweep.store import Store; Store('ro/new').check_writable()"
    proc = subprocess.run(without_file_override([sys.executable, "-c", probe]), cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 1 and "UserError: store ro/new: cannot write in ro (Permission denied)" in proc.stderr
    assert list((tmp_path / "ro").iterdir()) == []


def test_an_unreachable_s3_store_is_one_line_naming_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in DUMMY_AWS.items():
        monkeypatch.setenv(name, value)
    endpoint = f"127.0.0.1:{closed_port()}"
    uri = f"s3://bucket/prefix?endpoint_override={endpoint}&scheme=http"
    with pytest.raises(UserError) as info:
        Store(uri).models()
    assert str(info.value).startswith(f"store {uri}: cannot reach the endpoint {endpoint} (")
    assert "\n" not in str(info.value)


# What pyarrow's Google Cloud Storage client raises without a network (abridged: the real
# message repeats the OAuth advice), one line.
GCS_OFFLINE = ("google::cloud::Status(UNAVAILABLE: Retry policy exhausted, with a last message of Could not "
               "create a OAuth2 access token to authenticate the request. The underlying error message was: "
               "PerformWork() - CURL error [6]=Could not resolve hostname error_info={reason=, domain=, "
               "metadata={gcloud-cpp.retry.reason=retry-policy-exhausted, gcloud-cpp.retry.original-message="
               "Could not create a OAuth2 access token. The underlying error message was: PerformWork() - "
               "CURL error [6]=Could not resolve hostname}})")


@pytest.mark.parametrize(("uri", "seconds"), [("gs://bucket/x", GCS_RETRY_SECONDS),
                                              ("gs://bucket/x?retry_limit_seconds=5", 5)])
def test_a_gcs_store_retries_for_bounded_time_and_names_what_it_cannot_reach(
        uri: str, seconds: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow's own default is 15 minutes of retries: an offline gs:// store seemed to hang."""
    storage = Storage(uri)
    assert storage.fs.__reduce__()[1][0]["retry_time_limit"].total_seconds() == seconds

    class Offline:
        def get_file_info(self, path: object) -> None:
            raise OSError(GCS_OFFLINE)

    monkeypatch.setattr(storage, "fs", Offline())
    with pytest.raises(UserError) as info:
        storage.listing(storage.path("models"))
    assert str(info.value) == (f"store {uri}: cannot reach the endpoint of Google Cloud Storage "
                               "(CURL error: Could not resolve hostname)")


def test_a_store_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file; a store is a directory"):
        Store(tmp_path / "file")

