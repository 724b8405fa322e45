"""The Parquet store: tables ``models``, ``matrix`` and ``ensembles`` plus model checkpoints.

A store is a directory, local or on S3 (any URI ``pyarrow.fs`` resolves, e.g.
``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http``)::

    STORE/models/<model_id>.parquet         one row per trained model
    STORE/ensembles/<ensemble_id>.parquet   one row per ensemble
    STORE/matrix/<batch hash>.parquet       one file per written batch of attack-matrix cells
    STORE/checkpoints/<model_id>.pt         the model (rm_sweep.models checkpoint format)

Each table is a directory of Parquet files with one fixed schema, so anyone reads it without
this package: ``pd.read_parquet(STORE + "/models")``. A fact is written once: a model or an
ensemble is its own file named by its id (writing it again replaces it with the same fact), and
a matrix batch keeps only the cells the store does not hold yet. Every file appears whole or not
at all: locally it is written to a hidden temporary file in the same directory and renamed; on
S3 it is one upload, which S3 makes visible only when complete. Readers skip names starting with
``.`` or ``_`` (pyarrow's convention), so a temporary file is never read as data.

Writers: any number of processes may add models and ensembles at once (files never collide). The
matrix check "is this cell new?" reads the table first, so one process at a time should add
matrix rows (the matrix command's driver does).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import io
import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from torch import nn

import rm_sweep
from rm_sweep.atomic import atomic_write_bytes
from rm_sweep.errors import UserError
from rm_sweep.masks import MaskConfig
from rm_sweep.models import checkpoint_bytes, count_parameters, load_checkpoint
from rm_sweep.spec import EnsembleSpec, ModelSpec, canonical_json

_TIME = pa.timestamp("us", tz="UTC")

MODELS_SCHEMA = pa.schema([
    ("model_id", pa.string()),
    ("architecture", pa.string()),
    ("width", pa.float64()),
    ("dataset", pa.string()),
    ("train_subset", pa.int64()),
    ("test_subset", pa.int64()),
    ("variant", pa.string()),
    ("shallow_ratio", pa.float64()),
    ("deep_ratio", pa.float64()),
    ("channel_multiplier", pa.float64()),
    ("seed", pa.int64()),
    ("mask_seed", pa.int64()),
    ("recipe", pa.string()),
    ("epochs", pa.int64()),
    ("clean_accuracy", pa.float64()),
    ("train_accuracy", pa.float64()),
    ("train_loss", pa.float64()),
    ("train_seconds", pa.float64()),
    ("parameters", pa.int64()),
    ("checkpoint", pa.string()),
    ("config", pa.string()),
    ("code_version", pa.string()),
    ("created_at", _TIME),
])

ENSEMBLES_SCHEMA = pa.schema([
    ("ensemble_id", pa.string()),
    ("members", pa.list_(pa.string())),
    ("combine", pa.string()),
    ("n_members", pa.int64()),
    ("architecture", pa.string()),
    ("dataset", pa.string()),
    ("variant", pa.string()),
    ("shallow_ratio", pa.float64()),
    ("deep_ratio", pa.float64()),
    ("channel_multiplier", pa.float64()),
    ("config", pa.string()),
    ("created_at", _TIME),
])

MATRIX_SCHEMA = pa.schema([
    ("protocol", pa.string()),
    ("source_id", pa.string()),
    ("target_id", pa.string()),
    ("target_kind", pa.string()),
    ("attack", pa.string()),
    ("attack_params", pa.string()),
    ("limit", pa.int64()),
    ("eps_255", pa.float64()),
    ("sigma_255", pa.float64()),
    ("patches", pa.int64()),
    ("n_crafted", pa.int64()),
    ("n_fooled_source", pa.int64()),
    ("n_evaluated", pa.int64()),
    ("n_defended", pa.int64()),
    ("defense_rate", pa.float64()),
    ("code_version", pa.string()),
    ("created_at", _TIME),
])

# A matrix cell is identified by these columns; a second row with the same values is the same fact.
MATRIX_KEY = ("protocol", "source_id", "target_id", "attack", "attack_params", "limit")
# Filled by the store: numbers promoted out of attack_params, provenance.
_MATRIX_DERIVED = ("eps_255", "sigma_255", "patches", "code_version", "created_at")
TABLES = {"models": MODELS_SCHEMA, "matrix": MATRIX_SCHEMA, "ensembles": ENSEMBLES_SCHEMA}


def default_store_uri() -> str:
    """``$RM_SWEEP_STORE`` or ``store`` (a directory in the working directory)."""
    return os.environ.get("RM_SWEEP_STORE") or "store"


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


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a local path or a URI (``s3://bucket/key?options``)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{uri}: {str(exc).splitlines()[0]}") from None


def matrix_key(row: Mapping[str, Any]) -> tuple:
    """The identity of a matrix cell (``MATRIX_KEY`` values; a missing source is ``None``)."""
    return tuple(row.get(c) for c in MATRIX_KEY)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Store:
    """The store at ``uri``: a local directory (created on first write) or an ``s3://`` URI.

    Reading methods return pandas DataFrames with the table's columns, empty when the table has
    no file yet. A file that is not valid Parquet raises ``UserError`` naming it; nothing is
    deleted or rewritten because of it.
    """

    def __init__(self, uri: str | os.PathLike) -> None:
        uri = os.fspath(uri)
        if not uri:
            raise UserError("the store needs a location: a directory or an s3:// URI")
        self.uri = uri
        self._fs, root = resolve_uri(uri)
        parts = urlsplit(uri) if "://" in uri else None
        self._scheme = parts.scheme if parts else ""
        self._query = f"?{parts.query}" if parts and parts.query else ""
        self._root = root.rstrip("/")
        self._local = isinstance(self._fs, pafs.LocalFileSystem)
        # Parquet files are immutable once written (a model file is only ever replaced by the
        # same fact), so each is read once per Store and kept, keyed by path, size and mtime.
        self._cache: dict[tuple[str, int, Any], pa.Table] = {}

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # -- locations -----------------------------------------------------------------------------
    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem the store lives on (paths on it: ``path(...)``)."""
        return self._fs

    def path(self, *parts: str) -> str:
        """A path inside the store on ``filesystem`` (no scheme)."""
        return "/".join([self._root, *parts])

    def location(self, *parts: str) -> str:
        """The URI of a path inside the store, as a reader elsewhere would open it: a local
        absolute path, or ``s3://bucket/prefix/...`` followed by the store's query (endpoint)."""
        if self._local:
            return self.path(*parts)
        return f"{self._scheme}://{self.path(*parts)}{self._query}"

    def checkpoint_location(self, model_id: str) -> str:
        """Where the model's checkpoint lives (the URI recorded in its ``models`` row)."""
        if self._local:
            return self.path("checkpoints", f"{model_id}.pt")
        return f"{self._scheme}://{self.path('checkpoints', model_id + '.pt')}"

    # -- reading -------------------------------------------------------------------------------
    def models(self) -> pd.DataFrame:
        """One row per trained model (columns: ``MODELS_SCHEMA``), oldest first."""
        return self._frame("models", ["created_at", "model_id"])

    def matrix(self) -> pd.DataFrame:
        """One row per attack-matrix cell (columns: ``MATRIX_SCHEMA``), oldest first."""
        return self._frame("matrix", ["created_at", *MATRIX_KEY[:4]])

    def ensembles(self) -> pd.DataFrame:
        """One row per ensemble (columns: ``ENSEMBLES_SCHEMA``), oldest first."""
        return self._frame("ensembles", ["created_at", "ensemble_id"])

    def model_ids(self) -> set[str]:
        """Ids of the models the store holds (reads file names only, not their content)."""
        return {Path(p).stem for p in self._files("models")}

    def has_model(self, model_id: str) -> bool:
        return self._exists(self.path("models", f"{model_id}.parquet"))

    def has_ensemble(self, ensemble_id: str) -> bool:
        return self._exists(self.path("ensembles", f"{ensemble_id}.parquet"))

    def matrix_keys(self) -> set[tuple]:
        """``matrix_key`` of every stored cell."""
        table = self._table("matrix").select(list(MATRIX_KEY))
        return {tuple(r[c] for c in MATRIX_KEY) for r in table.to_pylist()}

    def read_checkpoint_bytes(self, model_id: str) -> bytes:
        path = self.path("checkpoints", f"{model_id}.pt")
        if not self._exists(path):
            raise UserError(f"store {self.uri} has no checkpoint for model {model_id}")
        with self._fs.open_input_stream(path) as f:
            return f.read()

    def load_model(self, model_id: str) -> nn.Module:
        """The trained model ``model_id``, on the CPU, in eval mode."""
        buf = io.BytesIO(self.read_checkpoint_bytes(model_id))
        buf.name = self.checkpoint_location(model_id)  # named in load errors
        return load_checkpoint(buf).eval()

    # -- writing -------------------------------------------------------------------------------
    def add_model(self, spec: ModelSpec, metrics: Mapping[str, Any], checkpoint: bytes | os.PathLike | str | nn.Module) -> dict[str, Any]:
        """Store a trained model: its checkpoint, then its ``models`` row (the row is the commit:
        a checkpoint without a row is an unfinished write, replaced by the next one).

        Args:
            spec: what was trained.
            metrics: ``rm_sweep.train.fit``'s result: ``clean_accuracy``, ``epochs``,
                ``train_accuracy``, ``train_loss``, ``train_seconds``.
            checkpoint: the checkpoint file's bytes or local path, or the trained model itself.
        Returns:
            the row written, as a dict.
        """
        if isinstance(checkpoint, nn.Module):
            data = checkpoint_bytes(checkpoint, extra={"spec": spec.to_dict()})
        elif isinstance(checkpoint, bytes):
            data = checkpoint
        else:
            data = Path(checkpoint).read_bytes()
        buf = io.BytesIO(data)
        buf.name = f"checkpoint of {spec.model_id}"
        model = load_checkpoint(buf)
        config = model.config
        built = dataclasses.replace(spec, arch=config.arch, width=config.width, mask=config.mask or MaskConfig())
        if built != spec:
            raise UserError(f"checkpoint of {spec.model_id} holds {config.arch} width {config.width} with "
                            f"{config.mask}, not the spec's {spec.arch} width {spec.width} with {spec.mask}")
        missing = [k for k in ("clean_accuracy", "epochs") if k not in metrics]
        if missing:
            raise UserError(f"metrics of {spec.model_id} lack {', '.join(missing)}")
        model_id = spec.model_id
        self._write(self.path("checkpoints", f"{model_id}.pt"), data)
        row = {
            "model_id": model_id,
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
            "train_accuracy": _float_or_none(metrics.get("train_accuracy")),
            "train_loss": _float_or_none(metrics.get("train_loss")),
            "train_seconds": _float_or_none(metrics.get("train_seconds")),
            "parameters": count_parameters(model),
            "checkpoint": self.checkpoint_location(model_id),
            "config": canonical_json(spec.to_dict()),
            "code_version": code_version(),
            "created_at": _now(),
        }
        self._write_table(self.path("models", f"{model_id}.parquet"), [row], MODELS_SCHEMA)
        return row

    def add_ensemble(self, ensemble: EnsembleSpec) -> bool:
        """Record an ensemble whose members are all stored; False if it was already recorded."""
        if self.has_ensemble(ensemble.ensemble_id):
            return False
        stored = self.model_ids()
        missing = [m for m in ensemble.member_ids if m not in stored]
        if missing:
            raise UserError(f"ensemble {ensemble.ensemble_id}: member model(s) {', '.join(missing)} are not in the store")
        first = ensemble.members[0]
        row = {
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
            "created_at": _now(),
        }
        self._write_table(self.path("ensembles", f"{ensemble.ensemble_id}.parquet"), [row], ENSEMBLES_SCHEMA)
        return True

    def add_ensembles(self, ensembles: Iterable[EnsembleSpec]) -> int:
        """Record each ensemble whose members are all stored; returns how many were new."""
        stored = self.model_ids()
        return sum(self.add_ensemble(e) for e in ensembles if all(m in stored for m in e.member_ids))

    def add_matrix(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Add attack-matrix cells the store does not hold yet; returns how many were added.

        Each row needs the ``MATRIX_KEY`` columns (``source_id`` may be None for the noise and
        shuffle protocols; ``attack_params`` is a JSON object or a dict) and the counts
        ``n_crafted``, ``n_fooled_source``, ``n_evaluated``, ``n_defended``, ``defense_rate``
        and ``target_kind``. ``eps_255``, ``sigma_255`` and ``patches`` are copied out of
        ``attack_params`` so they can be filtered as numbers.
        """
        given = [c.name for c in MATRIX_SCHEMA if c.name not in _MATRIX_DERIVED]
        present = self.matrix_keys()
        new: dict[tuple, dict[str, Any]] = {}
        now, version = _now(), code_version()
        for i, row in enumerate(rows):
            missing = [c for c in given if c not in row]
            if missing:
                raise UserError(f"matrix row {i} lacks {', '.join(missing)}")
            row = {c: row[c] for c in given}
            params = row["attack_params"]
            params = json.loads(params) if isinstance(params, str) else dict(params)
            row["attack_params"] = canonical_json(params)
            row.update({k: params.get(k) for k in ("eps_255", "sigma_255", "patches")},
                       code_version=version, created_at=now)
            key = matrix_key(row)
            if key not in present and key not in new:
                new[key] = row
        if not new:
            return 0
        keys = sorted(new, key=canonical_json)
        name = hashlib.sha256(canonical_json(keys).encode()).hexdigest()[:16]
        self._write_table(self.path("matrix", f"{name}.parquet"), [new[k] for k in keys], MATRIX_SCHEMA)
        return len(new)

    # -- files ---------------------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        return self._fs.get_file_info(path).type == pafs.FileType.File

    def _infos(self, table: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path(table), allow_not_found=True)
        infos = [i for i in self._fs.get_file_info(selector)
                 if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                 and not i.base_name.startswith((".", "_"))]
        return sorted(infos, key=lambda i: i.path)

    def _files(self, table: str) -> list[str]:
        return [i.path for i in self._infos(table)]

    def _table(self, table: str) -> pa.Table:
        schema = TABLES[table]
        parts = []
        for info in self._infos(table):
            key = (info.path, info.size, info.mtime_ns)
            if key not in self._cache:
                self._cache[key] = _conform(self._read_parquet(info.path), schema)
            parts.append(self._cache[key])
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def _read_parquet(self, path: str) -> pa.Table:
        try:
            return pq.read_table(path, filesystem=self._fs)
        except (pa.ArrowException, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"store file {self._display(path)} is not readable Parquet ({reason}); "
                            "move it out of the store (its fact will be recomputed)") from None

    def _frame(self, table: str, order: list[str]) -> pd.DataFrame:
        frame = self._table(table).to_pandas()
        return frame.sort_values(order, kind="stable", ignore_index=True) if len(frame) else frame

    def _display(self, path: str) -> str:
        return path if self._local else f"{self._scheme}://{path}"

    def _write_table(self, path: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
        self._write(path, sink.getvalue().to_pybytes())

    def _write(self, path: str, data: bytes) -> None:
        """Write ``data`` so readers see the whole file or none of it."""
        if self._local:
            atomic_write_bytes(path, data)
        else:
            with self._fs.open_output_stream(path) as f:
                f.write(data)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones (files of older versions) null."""
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


__all__ = ["ENSEMBLES_SCHEMA", "MATRIX_KEY", "MATRIX_SCHEMA", "MODELS_SCHEMA", "Store", "TABLES", "code_version",
           "default_store_uri", "matrix_key", "resolve_uri"]
