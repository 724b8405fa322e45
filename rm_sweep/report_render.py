"""The report's text: paper tables as HTML, Markdown and LaTeX, and the self-contained HTML page.

Every cell of a paper table shows the paper's value, ours and the difference (ours minus the
paper's, in percentage points); ours carries its 95 % Wilson interval and, when several stored
cells (seeds) make it, their mean ± std. A cell the store lacks shows the paper's value and "-".
The page embeds every image as a ``data:`` URI and holds its own CSS: it needs nothing else.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable

import pandas as pd
from matplotlib.figure import Figure

from rm_sweep.formats import to_markdown
from rm_sweep.report_tables import FilledTable

MISSING = "-"
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
nav ul { columns: 2; } .note { color: #555; font-size: .92em; max-width: 70em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .25em .45em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; white-space: nowrap; }
.paper { color: #666; } .ours { font-weight: 600; } .ci, .seeds { color: #777; font-size: .85em; }
.up { color: #1a7f37; } .down { color: #b42318; } .none { color: #aaa; }
figure { margin: 1em 0 2em; } figure img { max-width: min(100%, 960px); border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
.gallery td { text-align: center; } .gallery img { image-rendering: pixelated; width: 96px; height: 96px; }
.wrong { color: #b42318; font-weight: 600; } .right { color: #1a7f37; }
"""


def number(value: float, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, or ``MISSING`` for NaN."""
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def png_bytes(figure: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data`` as a ``data:`` URI, so the page needs no other file."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes, alt: str, **attributes: str) -> str:
    """An ``<img>`` element holding PNG ``data``."""
    extra = "".join(f' {k}="{html.escape(v)}"' for k, v in attributes.items())
    return f'<img src="{data_uri(data)}" alt="{html.escape(alt)}"{extra}>'


# -- one cell, as text and as HTML -----------------------------------------------------------------
def _diff(cell: pd.Series) -> float:
    return cell["ours"] - cell["paper"]


def cell_text(cell: pd.Series, *, pm: str = "±") -> str:
    """``paper / ours [low, high] (difference)``, then ``; mean ± std over k cells`` when several
    stored cells make it; ``paper / -`` where the store has none."""
    n = int(cell["n_cells"])
    if not n:
        return f"{number(cell['paper'])} / {MISSING}"
    text = f"{number(cell['paper'])} / {number(cell['ours'])} [{number(cell['ci_low'], 1)}, {number(cell['ci_high'], 1)}]"
    if not math.isnan(cell["paper"]):
        text += f" ({_diff(cell):+.2f})"
    if n > 1:
        text += f"; {number(cell['mean'])} {pm} {number(cell['std'])} over {n}"
    return text


def accuracy_text(row: pd.Series, *, pm: str = "±") -> str:
    """The Acc column: ``paper / ours`` (mean ± std when several models)."""
    n = int(row["n_models"])
    if not n:
        return f"{number(row['paper'])} / {MISSING}"
    spread = f" {pm} {number(row['std'])} ({n} models)" if n > 1 else ""
    return f"{number(row['paper'])} / {number(row['ours'])}{spread}"


def _paper_and_missing(paper: float, n: int) -> tuple[str, str | None]:
    """The paper's value as a cell's first line, and the whole cell when the store has nothing
    for it (None otherwise)."""
    first = f'<div class="paper" title="the paper">{number(paper)}</div>'
    return first, (None if n else f'<td class="num">{first}<div class="none" title="not in the store">{MISSING}</div></td>')


def _cell_html(cell: pd.Series) -> str:
    n = int(cell["n_cells"])
    paper, missing = _paper_and_missing(cell["paper"], n)
    if missing:
        return missing
    counts = f"{int(cell['n_defended'])} of {int(cell['n_evaluated'])} defended, {n} stored cell(s)"
    ours = (f'<div class="ours" title="{counts}">{number(cell["ours"])} '
            f'<span class="ci">[{number(cell["ci_low"], 1)}, {number(cell["ci_high"], 1)}]</span></div>')
    diff = "" if math.isnan(cell["paper"]) else (
        f'<div class="{"up" if _diff(cell) >= 0 else "down"}" title="ours - paper">{_diff(cell):+.2f}</div>')
    seeds = (f'<div class="seeds" title="mean ± std over the stored cells">{number(cell["mean"])} ± '
             f'{number(cell["std"])} ({n})</div>') if n > 1 else ""
    return f'<td class="num">{paper}{ours}{diff}{seeds}</td>'


def _accuracy_html(row: pd.Series) -> str:
    n = int(row["n_models"])
    paper, missing = _paper_and_missing(row["paper"], n)
    if missing:
        return missing
    spread = f' <span class="seeds">± {number(row["std"])} ({n})</span>' if n > 1 else ""
    return f'<td class="num">{paper}<div class="ours">{number(row["ours"])}{spread}</div></td>'


# -- whole tables ----------------------------------------------------------------------------------
def _grid(filled: FilledTable, cell: Callable[[pd.Series], str], accuracy: Callable[[pd.Series], str]) -> pd.DataFrame:
    """The table's layout, each position rendered by ``cell`` / ``accuracy``: a frame of text."""
    table = filled.table
    cells = filled.cells.set_index(["row", "column"])
    records = []
    for i, row in enumerate(table.rows):
        record = {"target": row.label}
        record.update({c.label: cell(cells.loc[(i, j)]) for j, c in enumerate(table.columns)})
        record["Acc"] = accuracy(filled.accuracy.iloc[i])
        records.append(record)
    return pd.DataFrame(records)


def provenance(filled: FilledTable) -> str:
    """What the store's side of the table was made from, in one sentence."""
    models = filled.models
    widths = ", ".join(f"{w:g}" for w in sorted(models["width"].unique()))
    return (f"Ours: {filled.filled} of {len(filled.cells)} cells from {int(filled.cells['n_cells'].sum())} stored "
            f"cell(s) over {len(models)} model(s) (data {', '.join(sorted(models['dataset'].unique()))}; "
            f"width {widths}; recipe {', '.join(sorted(models['recipe'].unique()))}).")


def table_html(filled: FilledTable) -> str:
    """The table as HTML: caption, one row per paper row, one cell per paper cell."""
    table = filled.table
    cells = filled.cells.set_index(["row", "column"])
    head = "".join(f"<th>{html.escape(c.label)}</th>" for c in table.columns)
    body = []
    for i, row in enumerate(table.rows):
        tds = "".join(_cell_html(cells.loc[(i, j)]) for j in range(len(table.columns)))
        body.append(f"<tr><th>{html.escape(row.label)}</th>{tds}{_accuracy_html(filled.accuracy.iloc[i])}</tr>")
    return (f'<p class="note">{html.escape(table.caption)} {html.escape(provenance(filled))}</p>'
            f'<table class="paper-table" id="{table.key}-grid"><thead><tr><th>target</th>{head}<th>Acc</th></tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table>')


def table_markdown(filled: FilledTable) -> str:
    """The table as Markdown (each cell ``cell_text``) after its caption."""
    grid = _grid(filled, cell_text, accuracy_text)
    return f"{filled.table.caption} {provenance(filled)}\n\n{to_markdown(grid)}\n"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "ε": r"$\varepsilon$"}


def _latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters written as LaTeX reads them literally."""
    return "".join(_LATEX.get(char, char) for char in text)


def table_latex(filled: FilledTable) -> str:
    """The table as a LaTeX ``table`` (booktabs), each cell ``cell_text``."""
    grid = _grid(filled, cell_text, accuracy_text)
    lines = [r"\begin{table}[ht]", r"\centering\scriptsize",
             (rf"\caption{{{_latex_escape(filled.table.title + ': ' + filled.table.caption)} "
              rf"Cells: paper / ours [95\% Wilson interval] (ours $-$ paper).}}"),
             rf"\label{{tab:{filled.table.key}}}", rf"\begin{{tabular}}{{l{'r' * (len(grid.columns) - 1)}}}",
             r"\toprule", " & ".join(_latex_escape(str(c)) for c in grid.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_escape(str(v)) for v in row) + r" \\" for row in grid.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def page(title: str, intro: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole HTML document: ``sections`` are (anchor, heading, HTML body), listed at the top."""
    toc = "".join(f'<li><a href="#{a}">{html.escape(h)}</a></li>' for a, h, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{html.escape(h)}</h2>{content}</section>' for a, h, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{intro}<nav><ul>{toc}</ul></nav>{body}</body></html>\n")


__all__ = ["MISSING", "accuracy_text", "cell_text", "data_uri", "img", "number", "page", "png_bytes", "provenance",
           "table_html", "table_latex", "table_markdown"]
