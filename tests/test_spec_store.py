"""ModelSpec ids and the Parquet store: one fact once, atomic files, readable by plain pandas."""
from __future__ import annotations

import hashlib
import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from rm_sweep.errors import UserError
from rm_sweep.masks import MaskConfig
from rm_sweep.spec import EnsembleSpec, ModelSpec
from rm_sweep.store import Store
from rm_sweep.tables import ENSEMBLES_SCHEMA, MATRIX_SCHEMA, MODELS_SCHEMA

from tinystore import add_models, matrix_rows, metrics, spec, tiny_data


# -- ModelSpec -------------------------------------------------------------------------------------
def test_model_id_is_sha256_of_canonical_json():
    s = spec(mask=MaskConfig(shallow_ratio=0.5, seed=3))
    canonical = json.dumps(s.to_dict(), sort_keys=True, separators=(",", ":"))
    assert s.model_id == hashlib.sha256(canonical.encode()).hexdigest()[:16]


@pytest.mark.parametrize("a, b", [
    (dict(width=1), dict(width=1.0)),
    (dict(data="folder:../shared/data/cifar10-jpeg"), dict(data="folder:/mnt/data/cifar10-jpeg/")),
    (dict(recipe_overrides={"epochs": 10}), dict()),  # quick's own epochs: no override at all
    (dict(recipe_overrides={"epochs": 6, "milestones": [4, 5]}), dict(recipe_overrides={"epochs": 6})),
    (dict(recipe_overrides={"lr": 1}), dict(recipe_overrides={"lr": 1.0})),
    (dict(mask=MaskConfig(0.0, 0.0, "same", 2.0, 7)), dict(mask=MaskConfig())),  # no mask: nothing else matters
    (dict(mask=MaskConfig(shallow_ratio=1 / 2)), dict(mask=MaskConfig(shallow_ratio=0.5))),
])
def test_specs_that_train_the_same_model_share_an_id(a, b):
    assert spec(**a) == spec(**b)
    assert spec(**a).model_id == spec(**b).model_id


@pytest.mark.parametrize("change", [
    dict(arch="vgg19"), dict(width=0.25), dict(data="cifar10"), dict(data="folder:/x/other-data"),
    dict(train_subset=400), dict(test_subset=100), dict(recipe="paper"), dict(recipe_overrides={"epochs": 2}),
    dict(seed=1), dict(mask=MaskConfig(shallow_ratio=0.7)), dict(mask=MaskConfig(0.5, deep_ratio=0.5)),
    dict(mask=MaskConfig(0.5, seed=1)), dict(mask=MaskConfig(0.5, variant="same")),
    dict(mask=MaskConfig(0.5, variant="channel")), dict(mask=MaskConfig(0.5, channel_multiplier=2)),
    dict(mask=MaskConfig()),
])
def test_every_field_that_changes_the_model_changes_the_id(change):
    base = dict(mask=MaskConfig(shallow_ratio=0.5))
    assert spec(**{**base, **change}).model_id != spec(**base).model_id


def test_dc_models_have_no_masks_so_their_mask_seed_is_not_part_of_the_id():
    dc = dict(mask=MaskConfig(0.5, variant="channel", seed=3))
    assert spec(**dc).model_id == spec(mask=MaskConfig(0.5, variant="channel")).model_id


@pytest.mark.parametrize("definition", ["revision", "data_scheme"])
def test_the_definitions_a_model_is_built_with_are_part_of_its_id(definition, monkeypatch):
    import rm_sweep.spec as spec_module

    before = spec(mask=MaskConfig(shallow_ratio=0.5))
    written, before_id = before.to_dict(), before.model_id
    if definition == "revision":
        monkeypatch.setattr(spec_module, "model_revision", lambda arch: 99)
    else:
        monkeypatch.setattr(spec_module, "DATA_SCHEME", "another scheme")
    after = spec(mask=MaskConfig(shallow_ratio=0.5))
    assert after.to_dict()[definition] != written[definition] and after.model_id != before_id
    with pytest.raises(UserError, match=f"other definitions: {definition}"):
        ModelSpec.from_dict(written)


def test_a_model_stored_under_an_old_definition_is_not_reused(tmp_path):
    store = Store(tmp_path / "store")
    current = spec(mask=MaskConfig(shallow_ratio=0.5))
    old_config = {**current.to_dict(), "revision": current.to_dict()["revision"] - 1}
    old_id = hashlib.sha256(json.dumps(old_config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    old = {**{f.name: None for f in MODELS_SCHEMA}, "model_id": old_id, "architecture": "resnet18",
           "config": json.dumps(old_config), "clean_accuracy": 0.9, "epochs": 1}
    store._write_table(store.path("models", f"{old_id}.parquet"), [old], MODELS_SCHEMA)
    assert store.model_ids() == {old_id} and old_id != current.model_id
    assert not store.has_model(current.model_id)


def test_dc_models_are_narrower_networks_in_the_store_and_named_dc(tmp_path):
    from rm_sweep.query import model_label

    store = Store(tmp_path / "store")
    data = tiny_data()
    for variant in ("random", "channel"):
        s = spec(mask=MaskConfig(shallow_ratio=0.5, variant=variant))
        store.add_model(s, metrics(), s.create(data))
    rows = store.models().set_index("variant")
    assert rows.loc["channel", "parameters"] < rows.loc["random", "parameters"]
    assert model_label(rows.loc["channel"].to_dict() | {"variant": "channel"}).endswith(" DC")
    assert " DC " in spec(mask=MaskConfig(shallow_ratio=0.5, variant="channel")).label


def test_spec_round_trips_through_dict_and_json():
    s = spec(mask=MaskConfig(0.7, 0.3, "channel", 2.0, 4), recipe_overrides={"epochs": 3}, seed=5)
    again = ModelSpec.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and again.model_id == s.model_id
    assert again.recipe_config().epochs == 3


@pytest.mark.parametrize("bad, message", [
    (dict(arch="resnet19"), "unknown architecture"),
    (dict(width=0), "width must be a positive number"),
    (dict(train_subset=0), "train_subset must be a positive integer"),
    (dict(recipe="fast"), "unknown recipe"),
    (dict(recipe_overrides={"epoch": 3}), "recipe.epoch: unknown field"),
    (dict(data="imagenet"), "unknown data set"),
])
def test_invalid_specs_are_user_errors(bad, message):
    with pytest.raises(UserError, match=message):
        spec(**bad)


def test_ensemble_id_ignores_member_order_and_needs_distinct_members():
    members = [spec(mask=MaskConfig(0.5, seed=i)) for i in range(3)]
    assert EnsembleSpec(tuple(members)).ensemble_id == EnsembleSpec(tuple(reversed(members))).ensemble_id
    with pytest.raises(UserError, match="different models"):
        EnsembleSpec((members[0], members[0]))


def test_create_builds_the_specified_network():
    s = spec(mask=MaskConfig(shallow_ratio=0.5, seed=2), seed=3)
    a, b = s.create(tiny_data()), s.create(tiny_data())
    assert a.config.arch == "resnet18" and a.config.width == 0.125 and a.config.mask == s.mask
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- Store -----------------------------------------------------------------------------------------
def read_table(store: Store, table: str) -> pd.DataFrame:
    """What a reader without rm_sweep does: pandas on the table's directory."""
    return pd.read_parquet(store.path(table), filesystem=store.filesystem)


def test_an_empty_store_has_empty_tables_with_the_documented_columns(tmp_path):
    store = Store(tmp_path / "nothing-yet")
    for frame, schema in [(store.models(), MODELS_SCHEMA), (store.matrix(), MATRIX_SCHEMA),
                          (store.ensembles(), ENSEMBLES_SCHEMA)]:
        assert len(frame) == 0 and list(frame.columns) == schema.names
    assert not (tmp_path / "nothing-yet").exists()  # reading creates nothing


def test_models_land_once_with_loadable_checkpoints(store_uri):
    store = Store(store_uri)
    added = add_models(store, 3)
    store.add_model(added[0][0], metrics(0.9), added[0][1])  # the same model again: still one row
    models = store.models()
    assert sorted(models.model_id) == sorted(s.model_id for s, _ in added)
    assert read_table(store, "models").shape == models.shape
    row = models.set_index("model_id").loc[added[0][0].model_id]
    assert row.clean_accuracy == 0.9 and row.shallow_ratio == 0.5 and row.architecture == "resnet18"
    assert json.loads(row.config) == added[0][0].to_dict()
    x = torch.rand(2, 3, 32, 32)
    for s, model in added:
        assert store.has_model(s.model_id)
        assert torch.equal(store.load_model(s.model_id)(x), model.eval()(x))
    assert store.model_ids() == {s.model_id for s, _ in added}


def test_load_checkpoint_takes_what_the_checkpoint_column_holds(store_uri, request, monkeypatch):
    """``load_checkpoint`` reads the URI a ``models`` row records, an ``s3://`` one included. That
    URI names no endpoint: an S3-compatible server's comes from ``AWS_ENDPOINT_URL``, as for
    any AWS client; the store's own location (endpoint in its query) works as it is."""
    from rm_sweep.models import load_checkpoint

    store = Store(store_uri)
    (s, model), = add_models(store, 1)
    uri = store.models().checkpoint[0]
    x = torch.rand(2, 3, 32, 32)
    expected = model.eval()(x)
    if store_uri.startswith("s3://"):
        assert uri.startswith("s3://") and "?" not in uri
        located = store.location("checkpoints", f"{s.model_id}.pt")
        assert torch.equal(load_checkpoint(located).eval()(x), expected)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{request.getfixturevalue('s3_server').endpoint}")
    assert torch.equal(load_checkpoint(uri).eval()(x), expected)
    with pytest.raises(UserError, match=r"checkpoint .*0000000000000000\.pt does not exist"):
        load_checkpoint(uri.replace(s.model_id, "0" * 16))


def test_tables_are_plain_parquet_directories(tmp_path):
    store = Store(tmp_path / "store")
    (s, _), = add_models(store, 1)
    assert pd.read_parquet(str(tmp_path / "store" / "models")).model_id.tolist() == [s.model_id]
    files = sorted(p.relative_to(tmp_path / "store").as_posix() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert files == [f"checkpoints/{s.model_id}.pt", f"models/{s.model_id}.parquet"]  # no temporary file left behind


def test_s3_store_keeps_everything_in_the_bucket(s3_server, s3_uri):
    store = Store(s3_uri)
    (s, _), = add_models(store, 1)
    prefix = s3_uri.split("?")[0].split("/", 3)[3]
    assert s3_server.keys(prefix) == [f"{prefix}/checkpoints/{s.model_id}.pt", f"{prefix}/models/{s.model_id}.parquet"]
    assert pd.read_parquet(store.location("models")).model_id.tolist() == [s.model_id]
    assert store.models().checkpoint[0] == f"s3://{s3_server.bucket}/{prefix}/checkpoints/{s.model_id}.pt"


def test_matrix_adds_only_cells_it_does_not_hold(store_uri):
    store = Store(store_uri)
    assert store.add_matrix(matrix_rows("s", ["a", "b"])) == 2
    assert store.add_matrix(matrix_rows("s", ["a", "b"])) == 0  # rerun: nothing new
    assert store.add_matrix(matrix_rows("s", ["b", "c", "c"])) == 1  # only c, once
    assert store.add_matrix(matrix_rows("s", ["a"], attack="madry_fgsm")) == 1  # another attack is another fact
    matrix = store.matrix()
    assert len(matrix) == 4 and len(read_table(store, "matrix")) == 4
    assert matrix.groupby(["target_id", "attack"]).size().max() == 1
    assert (matrix.eps_255 == 8).all() and matrix.defense_rate.dtype == float


def test_matrix_batch_files_are_named_by_their_cells(tmp_path):
    store = Store(tmp_path)
    store.add_matrix(matrix_rows("s", ["a", "b"]))
    first = sorted(os.listdir(tmp_path / "matrix"))
    other = Store(tmp_path / "other")
    other.add_matrix(list(reversed(matrix_rows("s", ["a", "b"]))))
    assert sorted(os.listdir(tmp_path / "other" / "matrix")) == first


def test_matrix_rows_need_every_column(tmp_path):
    row = matrix_rows("s", ["a"])[0]
    del row["n_defended"]
    with pytest.raises(UserError, match="lacks n_defended"):
        Store(tmp_path).add_matrix([row])


def test_a_corrupt_file_is_named_and_nothing_stored_is_lost(tmp_path):
    store = Store(tmp_path)
    added = add_models(store, 2)
    store.add_matrix(matrix_rows("s", ["a"]))
    bad = tmp_path / "models" / "0000000000000000.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=f"store file {bad} is not readable Parquet"):
        store.models()
    with pytest.raises(UserError, match="0000000000000000.parquet"):
        Store(tmp_path).models()
    assert store.add_matrix(matrix_rows("s", ["a", "b"])) == 1  # other tables unaffected
    bad.unlink()
    assert sorted(store.models().model_id) == sorted(s.model_id for s, _ in added)


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    store = Store(tmp_path)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(UserError, match="cannot write .*: disk full"):
        add_models(store, 1)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_checkpoint_must_be_the_specified_model(tmp_path):
    s = spec(mask=MaskConfig(shallow_ratio=0.5))
    other = spec(mask=MaskConfig(shallow_ratio=0.7)).create(tiny_data())
    with pytest.raises(UserError, match="not the spec's"):
        Store(tmp_path).add_model(s, metrics(), other)
    assert Store(tmp_path).models().empty


def test_checkpoint_from_a_file_path(tmp_path):
    from rm_sweep.models import save_checkpoint

    s = spec()
    save_checkpoint(s.create(tiny_data()), tmp_path / "m.pt")
    store = Store(tmp_path / "store")
    store.add_model(s, metrics(), tmp_path / "m.pt")
    assert (tmp_path / "store" / "checkpoints" / f"{s.model_id}.pt").read_bytes() == (tmp_path / "m.pt").read_bytes()


def test_ensembles_are_recorded_once_and_only_with_stored_members(tmp_path):
    store = Store(tmp_path)
    members = [s for s, _ in add_models(store, 2)]
    ens = EnsembleSpec(tuple(members))
    assert store.add_ensemble(ens) and not store.add_ensemble(ens)
    row = store.ensembles().iloc[0]
    assert row.ensemble_id == ens.ensemble_id and sorted(row.members) == ens.member_ids and row.n_members == 2
    missing = EnsembleSpec((members[0], spec(mask=MaskConfig(0.5, seed=9))))
    with pytest.raises(UserError, match="not in the store"):
        store.add_ensemble(missing)
    assert pq.read_table(tmp_path / "ensembles").num_rows == 1


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint for model abc"):
        Store(tmp_path).load_model("abc")
