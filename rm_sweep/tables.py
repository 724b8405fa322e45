"""The store's tables as data: their Parquet schemas, the key of each fact, and how rows are made.

A table is a directory of Parquet files with one fixed schema (``TABLES``); ``KEYS`` names the
columns that identify a fact, so a row with the same key values is the same fact. ``model_row``,
``ensemble_row`` and ``matrix_row`` build rows from the value types; ``conform`` reads any file of
a table into its schema. ``rm_sweep.store.Store`` moves these rows to and from files.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import rm_sweep
from rm_sweep.errors import UserError
from rm_sweep.spec import MATRIX_KEY, EnsembleSpec, ModelSpec, canonical_json

STRING, FLOAT, INT, TIME = pa.string(), pa.float64(), pa.int64(), pa.timestamp("us", tz="UTC")
# How a model is masked: columns of both the models and the ensembles table.
_MASK = {"variant": STRING, "shallow_ratio": FLOAT, "deep_ratio": FLOAT, "channel_multiplier": FLOAT}


def _schema(columns: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema(list(columns.items()))


MODELS_SCHEMA = _schema({
    "model_id": STRING, "architecture": STRING, "width": FLOAT, "dataset": STRING, "train_subset": INT,
    "test_subset": INT, **_MASK, "seed": INT, "mask_seed": INT, "recipe": STRING, "epochs": INT,
    "clean_accuracy": FLOAT, "train_accuracy": FLOAT, "train_loss": FLOAT, "train_seconds": FLOAT,
    "parameters": INT, "checkpoint": STRING, "config": STRING, "device": STRING, "code_version": STRING,
    "created_at": TIME,
})
ENSEMBLES_SCHEMA = _schema({
    "ensemble_id": STRING, "members": pa.list_(STRING), "combine": STRING, "n_members": INT, "architecture": STRING,
    "dataset": STRING, **_MASK, "config": STRING, "created_at": TIME,
})
MATRIX_SCHEMA = _schema({
    "protocol": STRING, "source_id": STRING, "target_id": STRING, "target_kind": STRING, "attack": STRING,
    "attack_params": STRING, "limit": INT,
    # Numbers promoted out of attack_params, so they can be filtered as numbers.
    "eps_255": FLOAT, "sigma_255": FLOAT, "patches": INT, "max_queries": INT,
    "n_crafted": INT, "n_fooled_source": INT, "n_evaluated": INT, "n_defended": INT, "defense_rate": FLOAT,
    "median_queries": FLOAT, "device": STRING, "code_version": STRING, "created_at": TIME,
})

TABLES = {"models": MODELS_SCHEMA, "matrix": MATRIX_SCHEMA, "ensembles": ENSEMBLES_SCHEMA}
KEYS = {"models": ("model_id",), "matrix": MATRIX_KEY, "ensembles": ("ensemble_id",)}
# Columns added after a table's first release: a file written before them is read with them null.
# Every other column must be in every file of the table, with its type.
ADDED_LATER = {"models": ("device",), "matrix": ("max_queries", "median_queries", "device"), "ensembles": ()}
# Filled in by ``matrix_row``: numbers promoted out of attack_params, and provenance.
_PROMOTED = ("eps_255", "sigma_255", "patches", "max_queries")
MATRIX_GIVEN = tuple(c.name for c in MATRIX_SCHEMA if c.name not in (*_PROMOTED, "code_version", "created_at"))
_OPTIONAL = ("median_queries", "device")  # only query cells have median_queries


@functools.cache
def code_version() -> str:
    """``rm_sweep.__version__``, plus ``+g<commit>`` (and ``.dirty``) when run from a git checkout."""
    version = rm_sweep.__version__
    repo = Path(rm_sweep.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}" + (".dirty" if dirty else "")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def model_row(spec: ModelSpec, metrics: Mapping[str, Any], parameters: int, checkpoint: str) -> dict[str, Any]:
    """The ``models`` row of a trained model.

    Args:
        spec: what was trained. metrics: ``rm_sweep.train.fit``'s result (``clean_accuracy``,
            ``epochs``; ``train_accuracy``, ``train_loss``, ``train_seconds``, ``device`` when known).
        parameters: trainable parameters of the network. checkpoint: the checkpoint's URI.
    """
    missing = [k for k in ("clean_accuracy", "epochs") if k not in metrics]
    if missing:
        raise UserError(f"metrics of {spec.model_id} lack {', '.join(missing)}")
    return {
        "model_id": spec.model_id,
        "architecture": spec.arch,
        "width": spec.width,
        "dataset": spec.data,
        "train_subset": spec.train_subset,
        "test_subset": spec.test_subset,
        "variant": spec.mask.variant,
        "shallow_ratio": spec.mask.shallow_ratio,
        "deep_ratio": spec.mask.deep_ratio,
        "channel_multiplier": spec.mask.channel_multiplier,
        "seed": spec.seed,
        "mask_seed": spec.mask.seed,
        "recipe": spec.recipe,
        "epochs": int(metrics["epochs"]),
        "clean_accuracy": float(metrics["clean_accuracy"]),
        **{k: _float_or_none(metrics.get(k)) for k in ("train_accuracy", "train_loss", "train_seconds")},
        "parameters": parameters,
        "checkpoint": checkpoint,
        "config": canonical_json(spec.to_dict()),
        "device": metrics.get("device"),
        "code_version": code_version(),
        "created_at": now(),
    }


def ensemble_row(ensemble: EnsembleSpec) -> dict[str, Any]:
    """The ``ensembles`` row of an ensemble (its members' shared settings from the first member)."""
    first = ensemble.members[0]
    return {
        "ensemble_id": ensemble.ensemble_id,
        "members": ensemble.member_ids,
        "combine": ensemble.combine,
        "n_members": len(ensemble.members),
        "architecture": first.arch,
        "dataset": first.data,
        "variant": first.mask.variant,
        "shallow_ratio": first.mask.shallow_ratio,
        "deep_ratio": first.mask.deep_ratio,
        "channel_multiplier": first.mask.channel_multiplier,
        "config": canonical_json(ensemble.to_dict()),
        "created_at": now(),
    }


def matrix_row(row: Mapping[str, Any], created_at: dt.datetime) -> dict[str, Any]:
    """A ``matrix`` row from a cell's fields and counts (``MATRIX_GIVEN``; ``median_queries`` only
    for query cells; ``device``, where the counts were computed, when known): ``attack_params`` (a dict or JSON) made canonical, its ``eps_255``,
    ``sigma_255``, ``patches`` and ``max_queries`` copied into columns of their own so they can be
    filtered as numbers, and provenance added."""
    missing = [c for c in MATRIX_GIVEN if c not in row and c not in _OPTIONAL]
    if missing:
        raise UserError(f"lacks {', '.join(missing)}")
    out = {c: row.get(c) for c in MATRIX_GIVEN}
    params = row["attack_params"]
    params = json.loads(params) if isinstance(params, str) else dict(params)
    out["attack_params"] = canonical_json(params)
    out.update({k: params.get(k) for k in _PROMOTED},
               code_version=code_version(), created_at=created_at)
    return out


def problem(name: str, schema: pa.Schema) -> str | None:
    """Why a file whose columns are ``schema`` is not a file of table ``name``, or None.

    A file lacking a column other than ``ADDED_LATER``'s (a key column above all), or holding
    one whose type does not convert to the table's without loss (a float seed, text counts),
    is foreign. Columns the table does not have are ignored (a later version's file).
    """
    expected = TABLES[name]
    lacking = [f.name for f in expected if f.name not in schema.names and f.name not in ADDED_LATER[name]]
    if lacking:
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        return f"it lacks column(s) {', '.join(lacking[:3])}{more}"
    for field in expected:
        if field.name in schema.names and not _converts(schema.field(field.name).type, field.type):
            return f"its column {field.name} is {schema.field(field.name).type}, not {field.type}"
    return None


def _converts(given: pa.DataType, wanted: pa.DataType) -> bool:
    """Whether values of type ``given`` become ``wanted`` without loss (int32 -> int64, any time
    unit -> microseconds in UTC; a column of nulls becomes anything)."""
    t = pa.types
    if given == wanted or t.is_null(given):
        return True
    if t.is_integer(wanted):
        return t.is_integer(given) and given != pa.uint64()
    if t.is_floating(wanted):
        return t.is_floating(given) or t.is_integer(given)
    if t.is_string(wanted):
        return t.is_string(given) or t.is_large_string(given)
    if t.is_timestamp(wanted):
        return t.is_timestamp(given)
    if t.is_list(wanted):
        return (t.is_list(given) or t.is_large_list(given)) and _converts(given.value_type, wanted.value_type)
    return False


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones (files of older versions) null.
    Check ``problem`` first: a column that does not convert raises here."""
    # A timestamp's digits below the microsecond (pandas writes nanoseconds) are cut, not an error.
    columns = [table[f.name].cast(f.type, safe=not pa.types.is_timestamp(f.type)) if f.name in table.column_names
               else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def deduplicate(name: str, table: pa.Table) -> pa.Table:
    """One row per fact of table ``name`` (rows with equal ``KEYS`` are one fact, e.g. a file
    copied within the store): the first written (``created_at``), in the original row order."""
    if table.num_rows < 2:
        return table
    numbered = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    by_age = numbered.take(pc.sort_indices(numbered, [("created_at", "ascending"), ("_row", "ascending")]))
    first = by_age.group_by(list(KEYS[name]), use_threads=False).aggregate([("_row", "first")])
    return table.take(sorted(first["_row_first"].to_pylist()))


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


__all__ = ["ADDED_LATER", "ENSEMBLES_SCHEMA", "KEYS", "MATRIX_GIVEN", "MATRIX_SCHEMA", "MODELS_SCHEMA", "TABLES",
           "code_version", "conform", "deduplicate", "ensemble_row", "matrix_row", "model_row", "now", "problem"]
