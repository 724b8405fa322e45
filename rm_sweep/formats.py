"""A table's output formats, shared by ``query`` and the report: an aligned table, CSV, Markdown
(GitHub style, numbers right-aligned), a LaTeX ``tabular`` with booktabs rules, or Parquet."""
from __future__ import annotations

import io
import math
import sys
from typing import Any

import pandas as pd
import pyarrow as pa

from rm_sweep.atomic import atomic_write_bytes
from rm_sweep.errors import UserError

FORMATS = ("table", "csv", "markdown", "latex", "parquet")


def to_markdown(frame: pd.DataFrame, *, index: bool = False) -> str:
    """A GitHub-style Markdown table (numbers right-aligned; no ``tabulate`` needed)."""
    if index:
        frame = frame.reset_index()
    cells = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    header = [str(c) for c in frame.columns]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    widths = [max([len(h), 3, *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in cells)])


def to_latex(frame: pd.DataFrame, *, index: bool = False) -> str:
    """A LaTeX ``tabular`` with booktabs rules (``\\usepackage{booktabs}``): text escaped, numbers
    right-aligned and printed as in ``to_markdown``, missing values blank."""
    frame = frame.reset_index() if index else frame.copy()
    # Text columns become plain strings first: LaTeX escaping applies to strings only, and a
    # list cell (an ensemble's members) would otherwise reach the page unescaped.
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column]):
            frame[column] = frame[column].map(_plain)
    return frame.to_latex(index=False, escape=True, na_rep="", float_format=_plain)


def _plain(value: Any) -> str:
    """A cell as text: blank when missing, floats to 6 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _cell(value: Any) -> str:
    """A Markdown cell: ``_plain`` with ``|`` escaped."""
    return _plain(value).replace("|", "\\|")


def write(frame: pd.DataFrame, fmt: str, out: str | None, *, index: bool = False) -> None:
    """Print ``frame`` as ``fmt`` to stdout, or write it to ``out``; Parquet needs ``out`` or a
    stdout that is not a terminal."""
    if fmt == "parquet":
        buffer = io.BytesIO()
        try:
            (frame if index else frame.reset_index(drop=True)).to_parquet(buffer, index=index)
        except (pa.ArrowException, ValueError) as exc:  # two columns of one name, a type Parquet lacks
            raise UserError(f"cannot write Parquet: {str(exc).splitlines()[0]}") from None
        if out:
            atomic_write_bytes(out, buffer.getvalue())
        elif sys.stdout.isatty():
            raise UserError("--format parquet writes binary: give --out FILE or redirect stdout")
        else:
            sys.stdout.buffer.write(buffer.getvalue())
            sys.stdout.flush()
        return
    if fmt == "csv":
        text = frame.to_csv(index=index)
    elif fmt == "markdown":
        text = to_markdown(frame, index=index) + "\n"
    elif fmt == "latex":
        text = to_latex(frame, index=index)
    else:
        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200,
                               "display.max_colwidth", 60):
            text = (frame.to_string(index=index) if len(frame) else "(no rows)") + "\n"
    if out:
        atomic_write_bytes(out, text.encode())
    else:
        sys.stdout.write(text)


__all__ = ["FORMATS", "to_latex", "to_markdown", "write"]
