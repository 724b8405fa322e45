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

Readers check every file: one that lacks a column of its table or holds one of another type is
named in one line (``tables.problem``), and a fact found in several files (a copied file) is read
once (``tables.deduplicate``). A model counts as stored only with a checkpoint that is present
and whole (``Store.unusable``, the one rule behind ``missing``). Files get the permissions the
writer's umask gives (``rm_sweep.atomic``); one that cannot be read is named, never deleted.

Writers: any number of processes may add models and ensembles at once (files never collide). The
matrix check "is this cell new?" reads the table first, so one process at a time should add
matrix rows (the matrix command's driver does). Who trains which model is settled by leases
(``rm_sweep.leases``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from torch import nn

from rm_sweep import checks, tables
from rm_sweep.errors import UserError
from rm_sweep.masks import MaskConfig
from rm_sweep.models import checkpoint_bytes, count_parameters, load_checkpoint
from rm_sweep.spec import MATRIX_KEY, EnsembleSpec, ModelSpec, canonical_json, matrix_key
from rm_sweep.storage import Storage

RUN_DIR = "_ray"  # Ray's run storage inside the store; "_" hides it from Parquet readers
NOT_STORED = "not in the store"  # what ``Store.unusable`` says of a model without a row


class Store:
    """The store at ``uri``: a local directory (created on first write) or an ``s3://`` URI.

    Reading methods return pandas DataFrames with the table's columns, one row per fact, empty
    when the table has no file yet. A file that is not valid Parquet, not a file of its table, or
    not readable raises ``UserError`` naming it; nothing is deleted or rewritten because of it.
    Every file operation fails in one line (``files``: ``rm_sweep.storage.Storage``).
    """

    def __init__(self, uri: str | os.PathLike) -> None:
        self.uri = os.fspath(uri)
        self.files = Storage(self.uri)
        # Parquet files are immutable once written (a model file is only ever replaced by the
        # same fact), so each is read (and each checkpoint checked) once per Store, keyed by
        # path, size and mtime.
        self._cache: dict[tuple[str, int, Any], pa.Table] = {}
        self._checked: dict[tuple[str, int, Any], str | None] = {}
        self._listings: dict[str, list[pafs.FileInfo]] | None = None  # set inside ``snapshot``

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # -- locations -----------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        """Whether the store is a local directory (else an object store: no atomic rename)."""
        return self.files.local

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem the store lives on (paths on it: ``path(...)``)."""
        return self.files.fs

    def path(self, *parts: str) -> str:
        """A path inside the store on ``filesystem`` (no scheme)."""
        return self.files.path(*parts)

    def location(self, *parts: str) -> str:
        """The URI of a path inside the store, as a reader elsewhere would open it: a local
        absolute path, or ``s3://bucket/prefix/...`` followed by the store's query (endpoint)."""
        return self.files.display(self.path(*parts)) + ("" if self.is_local else self.files.query)

    def checkpoint_location(self, model_id: str) -> str:
        """Where the model's checkpoint lives (the URI recorded in its ``models`` row)."""
        return self.files.display(self.path("checkpoints", f"{model_id}.pt"))

    def run_location(self, *parts: str) -> str:
        """Where Ray keeps its run state (``STORE/_ray/...``): shared storage on a cluster, so a
        trial whose node is lost resumes elsewhere. Only weights-only training states and Ray
        Train's JSON snapshots are read back from it (docs/security.md)."""
        return self.location(RUN_DIR, *parts)

    def training_runs(self) -> list[str]:
        """Model ids that have a Ray Train run (``_ray/train/<model_id>``: checkpoints of an
        unfinished training)."""
        return [i.base_name for i in self.files.listing(self.path(RUN_DIR, "train"))
                if i.type == pafs.FileType.Directory]

    def remove_training_state(self, model_id: str) -> None:
        """Delete a model's Ray Train run (``_ray/train/<model_id>``): once the model is in the
        store its training state is of no further use."""
        self.files.delete(self.path(RUN_DIR, "train", model_id))

    def exists(self) -> bool:
        """Whether anything is stored (locally: the directory exists)."""
        return self.files.info(self.path()).type != pafs.FileType.NotFound

    def check_writable(self) -> None:
        """Fail now, in one line, unless this process can write the store (``Storage.check_writable``),
        before any work whose results would have nowhere to go."""
        self.files.check_writable()

    # -- reading -------------------------------------------------------------------------------
    @contextmanager
    def snapshot(self) -> Iterator[Store]:
        """Within it, each directory of the store is listed once: a reader that asks for the same
        tables many times (the report pivots models, ensembles and matrix for every heatmap) sees
        one view of the store and costs one listing per table (on S3, one LIST request) instead of
        one per question. A write through this ``Store`` is seen at once; files other processes
        add meanwhile are seen after it."""
        outer = self._listings
        self._listings = {} if outer is None else outer
        try:
            yield self
        finally:
            self._listings = outer

    def missing(self, specs: Sequence[ModelSpec]) -> list[ModelSpec]:
        """The specs (in order) whose model the store cannot serve (``unusable``): the one rule
        for "what is left to train", used by every command."""
        unusable = self.unusable([s.model_id for s in specs])
        return [s for s in specs if s.model_id in unusable]

    def unusable(self, model_ids: Iterable[str]) -> dict[str, str]:
        """Why each model of ``model_ids`` that the store cannot serve is unusable: ``NOT_STORED``
        (no ``models`` row), or a row whose checkpoint is missing, empty or not a whole torch
        file (checked by its zip directory, a few KB read from its end). Such a model counts as
        missing: the next sweep trains it again and replaces the row. A checkpoint that exists but
        may not be read (permissions) is an error, not a reason to retrain."""
        model_ids = list(dict.fromkeys(model_ids))
        rows = self.model_ids()
        checkpoints = {Path(i.path).stem: i for i in self._infos("checkpoints", ".pt")}
        out = {m: NOT_STORED for m in model_ids if m not in rows}
        present = [checkpoints[m] for m in model_ids if m in rows and m in checkpoints]
        out.update({m: "its checkpoint is missing" for m in model_ids if m in rows and m not in checkpoints})
        with ThreadPoolExecutor(1 if self.is_local else 16) as pool:  # S3: one request each, in parallel
            for info, problem in zip(present, pool.map(self._checkpoint_problem, present)):
                if problem:
                    out[Path(info.path).stem] = f"its checkpoint is {problem}"
        return {m: out[m] for m in model_ids if m in out}

    def _checkpoint_problem(self, info: pafs.FileInfo) -> str | None:
        key = (info.path, info.size, info.mtime_ns)
        if key not in self._checked:
            self._checked[key] = self._zip_problem(info)
        return self._checked[key]

    def _zip_problem(self, info: pafs.FileInfo) -> str | None:
        if not info.size:
            return "empty"
        try:
            what = f"checkpoint {self.files.display(info.path)}"
            with self.files.errors(f"read {what}", reading=what), self.filesystem.open_input_file(info.path) as f:
                names = zipfile.ZipFile(f).namelist()
        except zipfile.BadZipFile:
            return "damaged (not a whole torch file)"
        return None if any(n.endswith("/data.pkl") for n in names) else "damaged (not a torch file)"

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
        """Whether the store can serve the model (``unusable``'s rule for one model): two file
        lookups and the checkpoint's zip directory, not a listing of the whole store, because
        every trial asks it."""
        if not self._exists(self.path("models", f"{model_id}.parquet")):
            return False
        info = self.files.info(self.path("checkpoints", f"{model_id}.pt"))
        return info.type == pafs.FileType.File and self._checkpoint_problem(info) is None

    def has_ensemble(self, ensemble_id: str) -> bool:
        return self._exists(self.path("ensembles", f"{ensemble_id}.parquet"))

    def matrix_keys(self) -> set[tuple]:
        """``matrix_key`` of every stored cell."""
        table = self._table("matrix").select(list(MATRIX_KEY))
        return {tuple(r[c] for c in MATRIX_KEY) for r in table.to_pylist()}

    def read_checkpoint_bytes(self, model_id: str) -> bytes:
        path = self.path("checkpoints", f"{model_id}.pt")
        if not self._exists(path):
            raise UserError(f"store {self.uri} has no checkpoint for model {model_id}; it counts as missing: the "
                            "next sweep trains it again")
        return self.files.read(path, f"checkpoint {self.files.display(path)}")

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
        row = tables.model_row(spec, metrics, count_parameters(model), self.checkpoint_location(spec.model_id))
        self._write(self.path("checkpoints", f"{spec.model_id}.pt"), data)
        self._write_table(self.path("models", f"{spec.model_id}.parquet"), [row], tables.MODELS_SCHEMA)
        return row

    def add_ensemble(self, ensemble: EnsembleSpec) -> bool:
        """Record an ensemble whose members are all stored; False if it was already recorded."""
        if self.has_ensemble(ensemble.ensemble_id):
            return False
        stored = self.model_ids()
        missing = [m for m in ensemble.member_ids if m not in stored]
        if missing:
            raise UserError(f"ensemble {ensemble.ensemble_id}: member model(s) {', '.join(missing)} are not in the store")
        self._write_table(self.path("ensembles", f"{ensemble.ensemble_id}.parquet"), [tables.ensemble_row(ensemble)],
                          tables.ENSEMBLES_SCHEMA)
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
        present = self.matrix_keys()
        new: dict[tuple, dict[str, Any]] = {}
        now = tables.now()
        for i, row in enumerate(rows):
            try:
                row = tables.matrix_row(row, now)
            except UserError as exc:
                raise UserError(f"matrix row {i} {exc}") from None
            key = matrix_key(row)
            if key not in present and key not in new:
                new[key] = row
        if not new:
            return 0
        keys = sorted(new, key=canonical_json)
        name = hashlib.sha256(canonical_json(keys).encode()).hexdigest()[:16]
        self._write_table(self.path("matrix", f"{name}.parquet"), [new[k] for k in keys], tables.MATRIX_SCHEMA)
        return len(new)

    # -- files ---------------------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        return self.files.info(path).type == pafs.FileType.File

    def _infos(self, directory: str, suffix: str = ".parquet") -> list[pafs.FileInfo]:
        if self._listings is None:
            listing = self.files.listing(self.path(directory))
        elif directory in self._listings:
            listing = self._listings[directory]
        else:
            listing = self._listings[directory] = self.files.listing(self.path(directory))
        return [i for i in listing if i.type == pafs.FileType.File
                and i.base_name.endswith(suffix) and not i.base_name.startswith((".", "_"))]

    def _files(self, table: str) -> list[str]:
        return [i.path for i in self._infos(table)]

    def arrow(self, table: str) -> pa.Table:
        """Table ``table`` (``models``, ``matrix`` or ``ensembles``) as one Arrow table in its
        schema: what every reader of the store (pandas, SQL, figures) reads."""
        checks.choice(table, tables.TABLES, "table")
        return self._table(table)

    def _table(self, table: str) -> pa.Table:
        """Every file of ``table`` in its schema, one row per fact."""
        schema = tables.TABLES[table]
        parts = []
        for info in self._infos(table):
            key = (info.path, info.size, info.mtime_ns)
            if key not in self._cache:
                self._cache[key] = self._read_file(table, info.path)
            parts.append(self._cache[key])
        return tables.deduplicate(table, pa.concat_tables(parts)) if parts else schema.empty_table()

    def _read_file(self, table: str, path: str) -> pa.Table:
        """A file of ``table`` in the table's schema; one line naming it if it is not one."""
        try:
            what = f"store file {self.files.display(path)}"
            with self.files.errors(f"read {what}", reading=what):
                data = pq.read_table(path, filesystem=self.filesystem)
        except pa.ArrowException as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"store file {self.files.display(path)} is not readable Parquet ({reason}); "
                            "move it out of the store (its fact will be recomputed)") from None
        problem = tables.problem(table, data.schema)
        if problem:
            raise UserError(f"store file {self.files.display(path)} is not a {table} file: {problem}; move it out of "
                            "the store")
        return tables.conform(data, tables.TABLES[table])

    def _frame(self, table: str, order: list[str]) -> pd.DataFrame:
        frame = self._table(table).to_pandas()
        return frame.sort_values(order, kind="stable", ignore_index=True) if len(frame) else frame

    def _write_table(self, path: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
        self._write(path, sink.getvalue().to_pybytes())

    def _write(self, path: str, data: bytes) -> None:
        self.files.write(path, data)
        if self._listings is not None:  # a snapshot sees its own writes
            self._listings.clear()


__all__ = ["NOT_STORED", "RUN_DIR", "Store"]
