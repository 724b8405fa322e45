"""The attack matrix on Ray: crafted once per (source, setting), served to every target by an actor
pool, equal cell for cell to the same protocols run in one process, complete despite a dead actor.

Tiny ResNet-18s on a toy data set (tests/tinystore.py), a local Ray instance with 2 CPUs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from rm_sweep.errors import UserError
from rm_sweep.orchestration.attack_matrix import plan, run_matrix, shard_targets
from rm_sweep.orchestration.values import MatrixOptions
from rm_sweep.pipeline import complete, matrix_images, missing_cells
from rm_sweep.spaces import SearchSpace, load_space
from rm_sweep.spec import MATRIX_KEY
from rm_sweep.store import Store

from tinystore import build, reference_counts, space_file

pytestmark = pytest.mark.ray

# Two normal sources, three targets: a normal model, a 0.5-Shallow model and a five-mask ensemble.
MODELS = [
    {"name": "sources", "seed": [0, 3]},
    {"name": "normal", "seed": 1},
    {"name": "shallow", "shallow_ratio": 0.5, "seed": 1},
    {"name": "ensemble", "shallow_ratio": 0.5, "seed": 2, "ensemble": 5},
]
MATRIX = [
    {"sources": ["sources"], "targets": ["normal", "shallow", "ensemble"], "attacks": ["madry_fgsm", "madry_pgd"],
     "protocols": ["black"]},
    {"targets": ["sources"], "attacks": ["madry_pgd"], "protocols": ["white"]},
    {"targets": ["normal", "ensemble"], "protocols": ["noise", "shuffle"], "sigmas": [16], "patches": [2]},
]


# Beyond the paper: the five-mask ensemble as a source, and query attacks on two targets.
BEYOND = [
    {"sources": ["ensemble"], "targets": ["normal", "shallow"], "attacks": ["madry_pgd"], "protocols": ["black"]},
    {"targets": ["normal", "shallow"], "attacks": ["square8_quick"], "protocols": ["query"], "limit": 6},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchSpace, Store, Path]:
    root = tmp_path_factory.mktemp("matrix")
    space, store = build(root, root / "data", MODELS, MATRIX)
    return space, store, root / "data"


@pytest.fixture(scope="module")
def reference(tiny: tuple[SearchSpace, Store, Path]) -> dict[tuple, object]:
    space, store, data_dir = tiny
    images, labels = matrix_images(space, data_dir)
    return reference_counts(space, store, list(space.cells), images, labels)


def _fresh_store(store: Store, root: Path) -> Store:
    """A copy of ``store`` with its models and ensembles but no matrix rows."""
    shutil.copytree(store.path(), root, ignore=shutil.ignore_patterns("matrix"))
    return Store(root)


def _row_key(row: dict) -> tuple:
    """A row's cell key; pandas reads a missing source (noise, shuffle) as NaN, cells hold None."""
    return tuple(None if c == "source_id" and not isinstance(row[c], str) else row[c] for c in MATRIX_KEY)


def _assert_matches(store: Store, space: SearchSpace, reference: dict) -> None:
    rows = store.matrix().to_dict("records")
    keys = [_row_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == len(space.cells)  # every cell once
    assert set(keys) == {c.key() for c in space.cells}
    assert {r["device"] for r in rows} == {"cpu"}  # where each cell was counted
    for row in rows:
        expected = reference[_row_key(row)]
        got = (row["n_crafted"], row["n_fooled_source"] if row["protocol"] not in ("noise", "shuffle") else None,
               row["n_evaluated"], row["n_defended"])
        assert got == (expected.n_crafted, expected.n_fooled_source, expected.n_evaluated, expected.n_defended), row


def test_space_has_the_cells_this_file_tests(tiny: tuple[SearchSpace, Store, Path]) -> None:
    space, _, _ = tiny
    protocols = [c.protocol for c in space.cells]
    # 2 sources x 3 targets x 2 settings black, 2 white, 2 targets x (1 sigma + 1 grid).
    assert (protocols.count("black"), protocols.count("white"), protocols.count("noise"),
            protocols.count("shuffle")) == (12, 2, 2, 2)
    assert sum(c.target_kind == "ensemble" for c in space.cells) == 2 * 2 + 2


def test_matrix_equals_in_process_counts_and_crafts_once_per_source_and_setting(
        local_ray, tiny: tuple[SearchSpace, Store, Path], reference: dict, tmp_path: Path) -> None:
    space, built, data_dir = tiny
    store = _fresh_store(built, tmp_path / "store")
    done = complete(space, store, data_dir=data_dir, verbose=0)
    report = done.matrix
    assert done.models_trained == 0 and report.cells == len(space.cells)
    _assert_matches(store, space, reference)
    # Cost: one crafting run per (source, setting) - the white cells reuse the madry_pgd sets -
    # and at most one forward pass per (set, target) plus one clean pass per target and image.
    assert report.crafts == 2 * 2
    black = store.matrix().query("protocol == 'black'")
    n_images = len(matrix_images(space, data_dir)[1])
    targets = black["target_id"].nunique()
    perturbed = store.matrix().query("protocol in ['noise', 'shuffle']")["n_crafted"].sum()
    assert report.forward_images <= black["n_fooled_source"].sum() + perturbed + targets * n_images


def test_rerun_adds_no_rows_and_starts_nothing(
        local_ray, tiny: tuple[SearchSpace, Store, Path], tmp_path: Path) -> None:
    space, built, data_dir = tiny
    store = _fresh_store(built, tmp_path / "store")
    first = complete(space, store, data_dir=data_dir, verbose=0)
    files = sorted(Path(store.path("matrix")).iterdir())
    again = complete(space, store, data_dir=data_dir, verbose=0)
    assert first.matrix.cells == len(space.cells)
    assert again.matrix is None and not again.started_ray
    assert sorted(Path(store.path("matrix")).iterdir()) == files
    assert missing_cells(space, store) == []


def test_missing_models_are_named_before_anything_runs(
        local_ray, tiny: tuple[SearchSpace, Store, Path], tmp_path: Path) -> None:
    space, built, data_dir = tiny
    store = _fresh_store(built, tmp_path / "store")
    (victim,) = [m for m in space.models() if m.seed == 1 and m.mask.shallow_ratio == 0]
    Path(store.path("models", f"{victim.model_id}.parquet")).unlink()
    images, labels = matrix_images(space, data_dir)
    with pytest.raises(UserError, match=victim.model_id):
        run_matrix(list(space.cells), store, images, labels, {e.ensemble_id: e.member_ids for e in space.ensembles()},
                   progress=False)
    assert store.matrix().empty


def test_a_checkpoint_deleted_during_the_run_is_one_line_at_once(
        local_ray, tiny: tuple[SearchSpace, Store, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver checks every model before it starts (``Store.unusable``); a checkpoint deleted
    after that check stops the run with one line naming it, not retries and a traceback."""
    space, built, data_dir = tiny
    store = _fresh_store(built, tmp_path / "store")
    (victim,) = [m for m in space.models() if m.seed == 1 and m.mask.shallow_ratio == 0]
    Path(store.path("checkpoints", f"{victim.model_id}.pt")).unlink()
    monkeypatch.setattr(Store, "unusable", lambda self, model_ids: {})  # deleted after the driver's check
    images, labels = matrix_images(space, data_dir)
    start = time.monotonic()
    with pytest.raises(UserError, match=f"has no checkpoint for model {victim.model_id}; it counts as missing") \
            as info:
        run_matrix(list(space.cells), store, images, labels, {e.ensemble_id: e.member_ids for e in space.ensembles()},
                   progress=False)
    assert "\n" not in str(info.value) and time.monotonic() - start < 60


def test_too_many_actors_for_the_cluster_is_a_user_error(
        local_ray, tiny: tuple[SearchSpace, Store, Path], tmp_path: Path) -> None:
    space, built, data_dir = tiny
    store = _fresh_store(built, tmp_path / "store")
    images, labels = matrix_images(space, data_dir)
    with pytest.raises(UserError, match="leave no room"):
        run_matrix(list(space.cells), store, images, labels, {e.ensemble_id: e.member_ids for e in space.ensembles()},
                   MatrixOptions(actors=2, cpus_per_actor=1.0), progress=False)


# -- planning, without Ray ---------------------------------------------------------------------
def test_plan_crafts_once_per_source_setting_and_limit(tiny: tuple[SearchSpace, Store, Path]) -> None:
    space, _, _ = tiny
    plans = plan(space.cells)
    crafts = [p for p in plans if p.source_id is not None]
    perturbs = [p for p in plans if p.source_id is None]
    assert sorted((p.source_id, p.job.attack) for p in crafts) == sorted(
        {(c.source_id, c.attack) for c in space.cells if c.source_id is not None})
    assert sum(len(p.cells) for p in crafts) + sum(len(p.cells) for p in perturbs) == len(space.cells)
    assert sorted((p.cells[0].protocol, *p.job.params.values()) for p in perturbs) == [("noise", 16), ("shuffle", 2)]
    # A changed limit is another crafting run: sets of different limits are different facts.
    more = [dataclasses.replace(c, limit=c.limit + 1) for c in space.cells if c.protocol == "black"]
    assert len([p for p in plan([*space.cells, *more]) if p.source_id is not None]) == 2 * len(crafts)


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_shards_hold_every_target_once_and_balance_members(shards: int) -> None:
    targets = {"ens_a": ["a1", "a2", "a3", "a4", "a5"], "m1": ["m1"], "m2": ["m2"], "m3": ["m3"], "ens_b": list("vwxyz")}
    groups = shard_targets(targets, shards)
    assert len(groups) == min(shards, len(targets)) and all(groups)
    held = [t for g in groups for t in g]
    assert sorted(held) == sorted(targets)
    loads = [sum(len(m) for m in g.values()) for g in groups]
    assert max(loads) - min(loads) <= 5  # no shard carries more than one ensemble beyond another


def test_images_are_the_models_test_split(tiny: tuple[SearchSpace, Store, Path]) -> None:
    space, store, data_dir = tiny
    images, labels = matrix_images(space, data_dir)
    assert images.dtype == torch.uint8 and images.shape == (100, 3, 16, 16)
    assert torch.bincount(labels).tolist() == [25] * 4


@pytest.mark.parametrize("actors", [1, 2])
def test_a_killed_actor_is_replaced_and_every_cell_lands_once(
        local_ray, tiny: tuple[SearchSpace, Store, Path], reference: dict, tmp_path: Path, actors: int) -> None:
    space, built, data_dir = tiny
    store = _fresh_store(built, tmp_path / "store")
    struck = local_ray.arm("call")  # the first shard actor to receive work exits its process (os._exit)
    images, labels = matrix_images(space, data_dir)
    ensembles = {e.ensemble_id: e.member_ids for e in space.ensembles()}
    options = MatrixOptions(actors=actors, cpus_per_actor=0.5)
    report = run_matrix(list(space.cells), store, images, labels, ensembles, options, progress=False)
    assert struck.exists()  # the crash happened
    assert report.actors == actors and report.cells == len(space.cells)
    _assert_matches(store, space, reference)


@pytest.fixture(scope="module")
def beyond(tiny: tuple[SearchSpace, Store, Path]) -> SearchSpace:
    """The same models (so the same ids and trained checkpoints) with the BEYOND matrix."""
    space, store, _ = tiny
    beyond = load_space(space_file(Path(store.path()).parent, Path(space.data.partition(":")[2]), MODELS, BEYOND,
                                   name="beyond"))
    assert {m.model_id for m in beyond.models()} == {m.model_id for m in space.models()}
    return beyond


def test_an_ensemble_source_is_crafted_once_and_scored_on_every_target(
        local_ray, tiny: tuple[SearchSpace, Store, Path], beyond: SearchSpace, tmp_path: Path) -> None:
    _, built, data_dir = tiny
    store = _fresh_store(built, tmp_path / "store")
    cells = [c for c in beyond.cells if c.protocol == "black"]
    (ensemble,) = beyond.ensembles()
    assert {c.source_id for c in cells} == {ensemble.ensemble_id} and len(cells) == 2
    images, labels = matrix_images(beyond, data_dir)
    report = run_matrix(cells, store, images, labels, {ensemble.ensemble_id: ensemble.member_ids}, progress=False)
    assert report.crafts == 1 and report.cells == 2  # one adversarial set, stored once, scored on both targets
    expected = reference_counts(beyond, store, cells, images, labels)
    assert len(store.matrix()) == 2
    for row in store.matrix().to_dict("records"):
        counts = expected[_row_key(row)]
        assert (row["n_crafted"], row["n_fooled_source"], row["n_evaluated"], row["n_defended"]) == (
            counts.n_crafted, counts.n_fooled_source, counts.n_evaluated, counts.n_defended)


def test_query_cells_count_their_budget_and_resume(
        local_ray, tiny: tuple[SearchSpace, Store, Path], beyond: SearchSpace, tmp_path: Path) -> None:
    _, built, data_dir = tiny
    store = _fresh_store(built, tmp_path / "store")
    cells = [c for c in beyond.cells if c.protocol == "query"]
    images, labels = matrix_images(beyond, data_dir)
    first = run_matrix(cells[:1], store, images, labels, {}, progress=False)  # an interrupted run kept one cell
    stored = store.matrix().to_dict("records")
    done = complete(beyond, store, data_dir=data_dir, options=MatrixOptions(actors=1), verbose=0)
    assert first.cells == 1 and done.matrix.cells == len(beyond.cells) - 1  # only what was missing
    rows = {_row_key(r): r for r in store.matrix().to_dict("records")}
    again = rows[_row_key(stored[0])]  # the stored cell was not computed again:
    assert again["created_at"] == stored[0]["created_at"] and again["n_defended"] == stored[0]["n_defended"]
    budget = json.loads(cells[0].attack_params)["max_queries"]
    expected = reference_counts(beyond, store, cells, images, labels)
    for cell in cells:
        row, counts = rows[cell.key()], expected[cell.key()]
        assert row["max_queries"] == budget and row["n_crafted"] == row["n_evaluated"] == 6
        assert (row["n_defended"], row["median_queries"]) == pytest.approx((counts.n_defended, counts.median_queries),
                                                                           nan_ok=True)
        assert math.isnan(row["median_queries"]) or 1 <= row["median_queries"] <= budget
