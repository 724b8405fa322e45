"""SQL over a store: DuckDB on the store's own Arrow tables, sealed off from everything else.

    run(Store("store"), "SELECT attack, median(defense_rate) FROM matrix GROUP BY attack")  # pyarrow.Table

The views ``models``, ``matrix`` and ``ensembles`` are ``Store.arrow`` registered with DuckDB;
``matrix`` also has ``ci_low`` and ``ci_high``, each rate's 95 % Wilson interval. ``Store`` is the one reader of the store, so SQL sees exactly the rows pandas and
the figures see, local or on S3 alike (pyarrow's filesystem reads S3; DuckDB's own S3 extension
is never used), in the tables' types: an ensemble's ``members`` is a list of strings,
``created_at`` a timestamp in UTC, and an undefined number (stored as NaN) is NULL.

Once the views are registered the connection is sealed, for one query and then closed:
external access is off (no file or URL is read or written: ``read_csv``, ``COPY ... TO``,
``ATTACH``, ``EXPORT DATABASE``, ``INSTALL``, ``LOAD`` of an extension not built in all fail), Python variables
are not scanned as tables, nothing spills to disk, and the configuration is locked (``SET``
fails). A query may still build temporary tables in memory; they vanish with the connection.
"""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from rm_sweep.errors import UserError
from rm_sweep.stats import wilson
from rm_sweep.store import Store
from rm_sweep.tables import TABLES

# Fixed when the connection opens, before anything is registered.
_CONFIG = {
    # DuckDB's Python client would otherwise read any DataFrame or Arrow table in the caller's
    # variables whose name a query mentions: only the store's tables are to be reachable.
    "python_enable_replacements": False,
    # Never fetch or load an extension behind the query's back (an S3 or HTTP reader, say).
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    # An in-memory database spills to ./.tmp under memory pressure even with external access
    # off; with no temporary directory a query too large for memory fails instead of writing.
    "temp_directory": "",
}
# Run after the views are registered (registering is itself external access), in this order:
# the lock comes last, so nothing a query says can undo the others.
_SEAL = (
    "SET TimeZone = 'UTC'",  # timestamps come back in the store's zone, not the machine's
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection holding the store's tables as views, sealed (see the module
    docstring). The caller closes it."""
    connection = duckdb.connect(":memory:", config=_CONFIG)
    try:
        for name in TABLES:
            table = nan_as_null(store.arrow(name))
            connection.register(name, with_interval_columns(table) if name == "matrix" else table)
        for statement in _SEAL:
            connection.execute(statement)
    except BaseException:
        connection.close()
        raise
    return connection


def nan_as_null(table: pa.Table) -> pa.Table:
    """``table`` with every floating-point NaN (the store's undefined value: the rate of a cell
    with no evaluated image, the median queries of a cell that fooled nothing) as NULL, which
    SQL's aggregates and ``IS NULL`` know; DuckDB counts NaN as a value (``avg`` of it is NaN)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_floating(field.type):
            column = table.column(i)
            table = table.set_column(i, field, pc.if_else(pc.is_nan(column), pa.scalar(None, field.type), column))
    return table


def with_interval_columns(matrix: pa.Table) -> pa.Table:
    """The matrix with ``ci_low`` and ``ci_high``: each defense rate's 95 % Wilson interval
    (NULL where no image was evaluated), computed on reading like ``query.read``'s."""
    low, high = wilson(matrix["n_defended"].to_numpy(zero_copy_only=False),
                       matrix["n_evaluated"].to_numpy(zero_copy_only=False))
    return (matrix.append_column("ci_low", pa.array(low, from_pandas=True))
            .append_column("ci_high", pa.array(high, from_pandas=True)))


def run(store: Store, query: str) -> pa.Table:
    """The result of ``query`` (DuckDB's SQL) over the store's tables; a statement without a
    result set (``CREATE TEMP TABLE ...``) gives DuckDB's row count (a ``Count`` column).

    Raises:
        UserError: ``SQL: <DuckDB's message>`` in one line, for any error DuckDB reports,
            an attempt to reach a file, a URL, an extension or a setting included.
    """
    connection = connect(store)
    try:
        result = connection.sql(query)
        return result.to_arrow_table() if result is not None else pa.table({})
    except duckdb.Error as exc:
        raise UserError(f"SQL: {_one_line(exc)}") from None
    finally:
        connection.close()


def _one_line(exc: duckdb.Error) -> str:
    """DuckDB's message without the quoted query and caret that follow a blank line, its
    remaining lines (``Did you mean "models"?``, candidate columns) joined into one."""
    paragraph = str(exc).strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in paragraph.splitlines() if line.strip()) or type(exc).__name__


__all__ = ["connect", "run"]
