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
    "median_queries": FLOAT, "code_version": STRING, "created_at": TIME,
})

TABLES = {"models": MODELS_SCHEMA, "matrix": MATRIX_SCHEMA, "ensembles": ENSEMBLES_SCHEMA}
KEYS = {"models": ("model_id",), "matrix": MATRIX_KEY, "ensembles": ("ensemble_id",)}
# Filled in by ``matrix_row``: numbers promoted out of attack_params, and provenance.
_PROMOTED = ("eps_255", "sigma_255", "patches", "max_queries")
MATRIX_GIVEN = tuple(c.name for c in MATRIX_SCHEMA if c.name not in (*_PROMOTED, "code_version", "created_at"))
_OPTIONAL = ("median_queries",)  # only query cells have it


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
    for query cells): ``attack_params`` (a dict or JSON) made canonical, its ``eps_255``,
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


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones (files of older versions) null."""
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


__all__ = ["ENSEMBLES_SCHEMA", "KEYS", "MATRIX_GIVEN", "MATRIX_SCHEMA", "MODELS_SCHEMA", "TABLES", "code_version",
           "conform", "ensemble_row", "matrix_row", "model_row", "now"]
