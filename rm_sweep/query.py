"""Read the store: list its tables, filter one, pivot the matrix into the paper's layout, or run SQL.

    python -m rm_sweep.query                                   # tables, rows, columns
    python -m rm_sweep.query models --where shallow_ratio=0.7 --columns model_id,seed,clean_accuracy
    python -m rm_sweep.query pivot --setting madry_pgd          # targets x sources, defense rate in %
    python -m rm_sweep.query --sql "SELECT attack, median(defense_rate) FROM matrix GROUP BY attack"
    python -m rm_sweep.query pivot --setting madry_pgd --format latex   # a LaTeX tabular for a paper

The same as Python, returning DataFrames::

    from rm_sweep import query
    query.table("store", "matrix", where=["attack=madry_pgd"])
    query.pivot("store", "madry_pgd")
    query.sql("store", "SELECT * FROM models WHERE clean_accuracy > 0.4")

SQL is DuckDB's (``stddev``, ``median``, ``PIVOT``, lists and timestamps as such) over the
store's own Arrow tables, read-only and reaching nothing else: ``rm_sweep.sql_engine``.
Output formats (``rm_sweep.formats``): an aligned table, CSV, Markdown, a LaTeX ``tabular`` or Parquet.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from rm_sweep import cli
from rm_sweep.errors import UserError, cli_main
from rm_sweep.formats import FORMATS, write
from rm_sweep.protocols import PROTOCOLS
from rm_sweep.spec import paper_label
from rm_sweep.stats import widest_cells, with_intervals
from rm_sweep.store import Store
from rm_sweep.tables import MATRIX_SCHEMA, TABLES

_COUNTS = ("n_crafted", "n_fooled_source", "n_evaluated", "n_defended")
_RATES = ("defense_rate", "ci_low", "ci_high")  # shown in percent
_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|!=|==|=|<|>)\s*(.*?)\s*$")


def _store(store: Store | str) -> Store:
    return store if isinstance(store, Store) else Store(store)


def tables(store: Store | str) -> pd.DataFrame:
    """The store's tables: columns ``table``, ``rows``, ``columns`` (comma-separated names)."""
    store = _store(store)
    frames = {name: read(store, name) for name in TABLES}
    return pd.DataFrame([{"table": name, "rows": len(frame), "columns": ", ".join(frame.columns)}
                         for name, frame in frames.items()])


def read(store: Store | str, name: str) -> pd.DataFrame:
    """A whole table (``models``, ``matrix`` or ``ensembles``); the matrix with ``ci_low`` and
    ``ci_high``, each defense rate's 95 % Wilson interval (``stats.with_intervals``)."""
    store = _store(store)
    if name not in TABLES:
        raise UserError(f"unknown table {name!r}; the store has {', '.join(TABLES)}")
    return with_intervals(store.matrix()) if name == "matrix" else getattr(store, name)()


def parse_condition(text: str) -> tuple[str, str, str]:
    """``"col=value"`` (or ``!=, <, <=, >, >=``) -> (column, operator, value text)."""
    match = _CONDITION.match(text)
    if match is None:
        raise UserError(f"--where {text!r}: expected COLUMN=VALUE (or !=, <, <=, >, >=)")
    column, op, value = match.groups()
    return column, "=" if op == "==" else op, value


def _typed(series: pd.Series, value: str, column: str) -> Any:
    """``value`` converted to the column's type."""
    if value.lower() in ("null", "none"):
        return None
    if pd.api.types.is_bool_dtype(series):
        if value.lower() not in ("true", "false"):
            raise UserError(f"--where {column}: expected true or false, got {value!r}")
        return value.lower() == "true"
    if pd.api.types.is_numeric_dtype(series):
        try:
            return float(value)
        except ValueError:
            raise UserError(f"--where {column}: column is numeric, got {value!r}") from None
    if pd.api.types.is_datetime64_any_dtype(series):
        try:
            return pd.Timestamp(value, tz="UTC") if pd.Timestamp(value).tzinfo is None else pd.Timestamp(value)
        except ValueError:
            raise UserError(f"--where {column}: expected a date/time, got {value!r}") from None
    return value


def filter_frame(frame: pd.DataFrame, where: Sequence[str]) -> pd.DataFrame:
    """Rows of ``frame`` meeting every condition (``col=value``, ``col>=value``, ...; values
    are read as the column's type; ``col=null`` matches missing values)."""
    keep = pd.Series(True, index=frame.index)
    for text in where:
        column, op, raw = parse_condition(text)
        if column not in frame.columns:
            raise UserError(f"--where {text!r}: no column {column!r}; columns: {', '.join(frame.columns)}")
        series = frame[column]
        value = _typed(series, raw, column)
        if value is None:
            if op not in ("=", "!="):
                raise UserError(f"--where {text!r}: null only works with = and !=")
            test = series.isna()
            keep &= test if op == "=" else ~test
            continue
        ops = {"=": series.eq, "!=": series.ne, "<": series.lt, "<=": series.le, ">": series.gt, ">=": series.ge}
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--where {text!r}: {raw} is not a finite number")
        if isinstance(value, float) and op in ("=", "!="):
            # Ratios are stored as floats: 0.7 must find 0.7 whatever its last bit.
            close = (series - value).abs() <= 1e-9 * max(1.0, abs(value))
            keep &= close if op == "=" else ~close
        else:
            keep &= ops[op](value)
    return frame[keep.to_numpy()]


def table(store: Store | str, name: str, where: Sequence[str] = (), columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Table ``name`` filtered by ``where`` (see ``filter_frame``), optionally only ``columns``."""
    frame = filter_frame(read(store, name), where)
    if columns:
        unknown = [c for c in columns if c not in frame.columns]
        if unknown:
            raise UserError(f"no column {unknown[0]!r} in {name}; columns: {', '.join(frame.columns)}")
        frame = frame[list(columns)]
    return frame.reset_index(drop=True)


def model_label(row: pd.Series | dict, *, ensemble: bool = False) -> str:
    """The paper's name (``rm_sweep.spec.paper_label``) of a ``models`` or ``ensembles`` row."""
    return paper_label(row["architecture"], row["shallow_ratio"], row["deep_ratio"], row["variant"],
                       row["channel_multiplier"], ensemble=ensemble)


def labels(store: Store) -> dict[str, str]:
    """Model and ensemble id -> paper label; labels that several ids share get the width, seed
    or mask seed that tells them apart, and the id's first digits if still shared."""
    base: dict[str, str] = {}
    qualifiers: dict[str, dict[str, str]] = {}
    for r in store.models().to_dict("records"):
        base[r["model_id"]] = model_label(r)
        qualifiers[r["model_id"]] = {"width": f"width {r['width']:g}", "seed": f"seed {r['seed']}",
                                     "mask": f"mask seed {r['mask_seed']}"}
    for r in store.ensembles().to_dict("records"):
        base[r["ensemble_id"]] = model_label(r, ensemble=True)
        qualifiers[r["ensemble_id"]] = {}
    groups = defaultdict(list)
    for i, label in base.items():
        groups[label].append(i)
    named = {}
    for label, ids in groups.items():
        differing = [k for k in ("width", "seed", "mask") if len({qualifiers[i].get(k) for i in ids}) > 1]
        for i in ids:
            extra = ", ".join(qualifiers[i][k] for k in differing if k in qualifiers[i])
            named[i] = f"{label} ({extra})" if extra else label
    counts = Counter(named.values())
    return {i: f"{label} [{i[:6]}]" if counts[label] > 1 else label for i, label in named.items()}


def _order(store: Store) -> dict[str, tuple]:
    """Sort key per id: architecture, then models before ensembles, then normal first, shallow, deep,
    variant, multiplier, seeds."""
    frames = [(store.models(), False, "model_id"), (store.ensembles(), True, "ensemble_id")]
    keys = {}
    for frame, ensemble, id_column in frames:
        for r in frame.to_dict("records"):
            keys[r[id_column]] = (r["architecture"], ensemble, r["shallow_ratio"], r["deep_ratio"], r["variant"],
                                  r["channel_multiplier"], r.get("seed", 0), r.get("mask_seed", 0))
    return keys


def pivot(store: Store | str, setting: str, *, protocol: str = "black", value: str = "defense_rate",
          where: Sequence[str] = (), ids: bool = False, pool: bool = False) -> pd.DataFrame:
    """The matrix for one attack setting in the paper's layout: one row per target, one column
    per source, values in percent (``defense_rate``) or counts, plus the target's clean accuracy
    in percent (``Acc``; blank for ensembles) as the paper's last column.

    Args:
        setting: the ``attack`` column's value (``madry_pgd``, ``pgd16``, ``noise``, ...).
        protocol: ``black``, ``gray``, ``white``, ``noise``, ``shuffle`` or ``query``.
        value: ``defense_rate``, ``ci_low`` or ``ci_high`` (its 95 % Wilson interval; all three
            shown in %) or a count column (``n_defended``, ``n_evaluated``, ...).
        where: further conditions on matrix columns (e.g. ``limit=1000``).
        ids: label rows and columns by id instead of the paper's names.
        pool: several cells for one (target, column) are one value instead of an error: of
            cells that differ only in their limit the widest (``widest_cells``), and the rest
            pooled (their counts summed, the rate recomputed).
    """
    store = _store(store)
    numeric = [f.name for f in MATRIX_SCHEMA if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    if value not in (*numeric, *_RATES):
        raise UserError(f"--value {value!r} is not a number column of the matrix; use defense_rate, ci_low, ci_high "
                        f"or a count column ({', '.join(c for c in numeric if c.startswith('n_'))})")
    matrix = filter_frame(read(store, "matrix"), [f"attack={setting}", f"protocol={protocol}", *where])
    if not len(matrix):
        raise UserError(f"the store has no {protocol} cells for {setting}{' with ' + ' '.join(where) if where else ''}")
    columns = "source_id" if PROTOCOLS[protocol].crafts else "attack_params"
    if pool:
        matrix = widest_cells(matrix)
    duplicated = matrix.duplicated(["target_id", columns], keep=False)
    if duplicated.any() and pool:
        if value not in (*_COUNTS, *_RATES):
            raise UserError(f"cannot pool {value!r} over several cells; use {', '.join(_RATES)} or a count column")
        pooled = matrix.groupby(["target_id", columns], as_index=False)[list(_COUNTS)].sum(min_count=1)
        matrix = with_intervals(pooled.assign(defense_rate=pooled["n_defended"] / pooled["n_evaluated"]))
    elif duplicated.any():
        example = matrix[duplicated].iloc[0]
        raise UserError(f"several {setting} cells for target {example['target_id']} and {columns} "
                        f"{example[columns]} (different limits or parameters); narrow with --where limit=N")
    grid = matrix.pivot(index="target_id", columns=columns, values=value).astype(float)
    if value in _RATES:
        grid = grid * 100
    models = store.models().set_index("model_id")
    grid["Acc"] = [models["clean_accuracy"].get(t, math.nan) * 100 for t in grid.index]
    order = _order(store)
    rows = sorted(grid.index, key=lambda i: order.get(i, ("~",)))
    column_key = (lambda c: _natural(_params_label(c))) if columns == "attack_params" else \
        (lambda c: order.get(c, ("~", c)))
    cols = sorted((c for c in grid.columns if c != "Acc"), key=column_key)
    grid = grid.loc[rows, [*cols, "Acc"]]
    if not ids:
        names = labels(store)
        if columns == "attack_params":
            grid.columns = [_params_label(c) if c != "Acc" else c for c in grid.columns]
        else:
            grid.columns = [f"from {names.get(c, c)}" if c != "Acc" else c for c in grid.columns]
        grid.index = [names.get(i, i) for i in grid.index]
    grid.index.name = "target"
    grid.columns.name = None
    return grid.round(2)


def _params_label(params: str) -> str:
    """``{"sigma_255": 8}`` -> ``sigma 8/255``; ``{"patches": 4}`` -> ``4x4 patches``; a query
    setting's -> ``1000 queries`` (its budget)."""
    d = json.loads(params)
    if "sigma_255" in d:
        return f"sigma {d['sigma_255']:g}/255"
    if "patches" in d:
        return f"{d['patches']}x{d['patches']} patches"
    if "max_queries" in d:
        return f"{d['max_queries']} queries"
    return params


def _natural(label: str) -> list:
    """Sort key comparing the numbers in ``label`` as numbers: ``sigma 8/255`` before ``sigma 16/255``."""
    return [float(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", label))]


def sql(store: Store | str, query: str) -> pd.DataFrame:
    """Run a DuckDB ``query`` over the store's tables ``models``, ``matrix`` and ``ensembles``.

    DuckDB's SQL on the tables' own types: aggregates such as ``stddev`` and ``median``,
    ``PIVOT``, an ensemble's ``members`` as a list (``len(members)``, ``unnest(members)``),
    ``created_at`` as a UTC timestamp. Read-only: the query reaches these three tables and
    nothing else (no file, URL, extension or setting; ``rm_sweep.sql_engine``).

    Returns:
        the result, one column per selected expression (lists as arrays, timestamps tz-aware).
    Raises:
        UserError: ``SQL: ...``, DuckDB's message in one line, or a result pandas cannot hold
            (a UNION value, a date beyond pandas' range).
    """
    from rm_sweep import sql_engine  # DuckDB: only --sql needs it

    result = sql_engine.run(_store(store), query)
    try:
        return result.to_pandas()
    except (pa.ArrowException, ValueError, OverflowError) as exc:
        raise UserError(f"SQL: the result cannot be shown ({str(exc).splitlines()[0]}); "
                        "cast the column (e.g. CAST(x AS VARCHAR))") from None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(
        "python -m rm_sweep.query",
        "Read the store. Without arguments: list its tables. TABLE: print a table (filtered with --where). "
        "pivot --setting S: the matrix for one attack setting as targets x sources, the paper's layout. "
        "--sql: a DuckDB query over models, matrix and ensembles (read-only; nothing else is reachable).")
    parser.epilog = ("examples: models --where shallow_ratio=0.9 --columns model_id,seed,clean_accuracy | "
                     "pivot --setting madry_pgd --format markdown | "
                     "--sql \"SELECT attack, median(defense_rate) FROM matrix GROUP BY attack\"")
    parser.add_argument("what", nargs="?", choices=[*TABLES, "pivot"], help="a table, or pivot")
    cli.add_store(parser)
    parser.add_argument("--where", action="append", default=[], metavar="COL=VALUE",
                        help="keep rows where COL=VALUE (also !=, <, <=, >, >=); repeat to combine")
    parser.add_argument("--columns", default=None, help="comma-separated columns to show (tables only)")
    parser.add_argument("--setting", default=None, help="pivot: the attack setting (madry_pgd, pgd16, noise, ...)")
    parser.add_argument("--protocol", default="black", choices=PROTOCOLS,
                        help="pivot: the protocol (default black)")
    parser.add_argument("--value", default="defense_rate",
                        help="pivot: defense_rate, ci_low or ci_high (its 95 %% Wilson interval; all in %%) or a count "
                             "column")
    parser.add_argument("--ids", action="store_true", help="pivot: label rows and columns by id")
    parser.add_argument("--sql", default=None,
                        help="a DuckDB query over the tables models, matrix, ensembles (stddev, median, PIVOT, ...)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: an aligned table)")
    parser.add_argument("--out", default=None, help="write to this file instead of stdout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.out is not None:
        cli.output_file(args.out)
    store = cli.existing_store(args.store)
    if args.sql is not None:
        if args.what is not None:
            raise UserError("--sql takes no table or pivot argument")
        if not args.sql.strip():
            raise UserError("--sql needs a query, e.g. --sql \"SELECT * FROM models\"")
        write(sql(store, args.sql), args.format, args.out)
    elif args.what == "pivot":
        if not args.setting:
            raise UserError("pivot needs --setting (e.g. --setting madry_pgd)")
        with store.snapshot():  # a pivot reads the models for its labels, its order and its Acc column
            grid = pivot(store, args.setting, protocol=args.protocol, value=args.value, where=args.where, ids=args.ids)
        write(grid, args.format, args.out, index=True)
    elif args.what is not None:
        columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
        write(table(store, args.what, args.where, columns), args.format, args.out)
    elif args.format == "table" and not args.out:
        for row in tables(store).itertuples():
            print(f"{row.table} ({row.rows} rows): {row.columns}")
    else:
        write(tables(store), args.format, args.out)
    return 0


__all__ = ["filter_frame", "labels", "model_label", "pivot", "read", "sql", "table", "tables"]

if __name__ == "__main__":
    cli_main(main)
