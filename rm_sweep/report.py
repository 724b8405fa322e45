"""``python -m rm_sweep.report``: one self-contained HTML page of what a store holds, beside the paper.

    python -m rm_sweep.report --store store --out report.html --data folder:../shared/data/cifar10-jpeg

The page holds Fig. 14 (from the store's own cells), every paper table the store can fill (each
cell: the paper's value, ours with its 95 % Wilson interval, the difference), the attack matrix
as heatmaps (one per protocol and attack setting), and galleries like the paper's Fig. 1 and
Fig. 12 (clean test images beside their adversarials from each source, with a normal and a
masked target's predictions; crafted on the CPU, so they need ``--data``). Every image is
embedded, so the file opens anywhere. Beside it: ``report.md`` and ``report_tables.tex`` (the
same tables) and ``report_figures/`` (each figure as PNG and PDF; Fig. 14 also as SVG). Nothing
is trained or attacked beyond the gallery's few images, and Ray is never started.
"""
from __future__ import annotations

import argparse
import datetime as dt
import html
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from rm_sweep import cli
from rm_sweep.atomic import atomic_write_bytes
from rm_sweep.errors import UserError, cli_main
from rm_sweep.figures import draw_fig14, fig14_rows, fig14_summary, fig14_table, training_scale
from rm_sweep.formats import to_markdown
from rm_sweep.gallery import IMAGES, draw_gallery, gallery_html, make_gallery
from rm_sweep.heatmaps import column_label, draw_heatmap, heatmap_grid, heatmap_pairs
from rm_sweep.paper_results import fig14_points
from rm_sweep.query import model_label
from rm_sweep.report_render import img, number, page, png_bytes, table_html, table_latex, table_markdown
from rm_sweep.report_tables import fill_tables
from rm_sweep.spec import parse_data_spec
from rm_sweep.store import Store

LEGEND = ("Each cell of a paper table: the paper's value (grey), ours (bold) with its 95 % Wilson interval, the "
          "difference ours - paper in points (green when ours is higher), and, where several stored cells (seeds, "
          "limits) make it, their mean ± std and count. '-': the store has no such cell. Rates are defense rates "
          "in percent; Acc is clean test accuracy.")


@dataclass
class Report:
    """What ``build`` made: the documents, and counts of what they show."""

    html: str = ""
    markdown: str = ""
    latex: str = ""
    tables: list[str] = field(default_factory=list)  # titles of the paper tables shown
    heatmaps: int = 0
    fig14: bool = False
    gallery_rows: int = 0
    gallery_sources: int = 0


def output_paths(out: str | Path) -> tuple[Path, Path, Path, Path]:
    """(HTML, Markdown, LaTeX, figure directory) for ``--out``; a ``UserError`` unless it names
    an ``.html`` file that is not a directory."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the report's file name, e.g. {out / 'report.html'}")
    if out.suffix.lower() != ".html":
        raise UserError(f"--out must name an .html file (its .md, _tables.tex and _figures/ go beside it), got {out}")
    cli.output_file(str(out), make_parent=True)
    markdown, latex, figures = out.with_suffix(".md"), out.with_name(f"{out.stem}_tables.tex"), \
        out.with_name(f"{out.stem}_figures")
    cli.written_beside(out, files=(markdown, latex), dirs=(figures,))
    return out, markdown, latex, figures


def _save(figure: Figure, figures: Path, name: str) -> bytes:
    """Write ``figure`` as ``name``.png and .pdf under ``figures``; return the PNG's bytes."""
    figures.mkdir(parents=True, exist_ok=True)
    data = png_bytes(figure)
    (figures / f"{name}.png").write_bytes(data)
    figure.savefig(figures / f"{name}.pdf")
    return data


def _figure(data: bytes, alt: str, caption: str) -> str:
    return f"<figure>{img(data, alt)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _models(store: Store) -> tuple[str, str]:
    """The stored models grouped by the paper's name and training: clean accuracy over seeds."""
    models = store.models()
    if not len(models):
        return "<p>The store holds no models.</p>", "The store holds no models.\n"
    models = models.assign(model=[model_label(r) for r in models.to_dict("records")],
                           clean=models["clean_accuracy"] * 100)
    groups = models.groupby(["model", "dataset", "width", "recipe", "epochs"], sort=False)["clean"]
    table = groups.agg(["size", "mean", "std"]).reset_index()
    table["clean acc %"] = [number(m) + (f" ± {number(s)}" if n > 1 else "")
                            for m, s, n in zip(table["mean"], table["std"], table["size"])]
    table = table.rename(columns={"size": "models"}).drop(columns=["mean", "std"])
    return table.to_html(index=False, border=0), to_markdown(table) + "\n"


def _fig14(store: Store, figures: Path, report: Report) -> tuple[str, str]:
    rows = fig14_rows(store, allow_empty=True)
    if not len(rows):
        text = ("The store holds no Fig. 14 cells: black-box madry_fgsm / madry_pgd cells from a normal ResNet-18 "
                "onto single ResNet-18s with only random shallow masks (search_spaces/quick.yaml makes some).")
        return f"<p>{html.escape(text)}</p>", text + "\n"
    summary = fig14_summary(rows)
    paper = fig14_points() if training_scale(store, rows) != "demo" else None
    draw_fig14(summary, figures / "fig14.png", rows=rows, paper=paper,
               title="Fig. 14: ResNet-18 with shallow Random Mask, black-box from a normal ResNet-18")
    report.fig14 = True
    caption = ("Defense rates: the counts of each ratio's (source, target) pairs pooled, with their 95 % Wilson "
               "interval as bars (several seeds: each pair a dot); clean accuracy: mean ± std over seeds. The table "
               "gives mean ± std over seeds and the pooled interval in brackets. " + ("The paper's points are overlaid (dashed)." if paper is not None else
               "The models are not trained as the paper's (full CIFAR-10, width 1, its recipe), so the paper's "
               "points are not overlaid; Table 1 and Tables 8-12 below hold its numbers."))
    table = fig14_table(summary, paper).reset_index()
    return (_figure((figures / "fig14.png").read_bytes(), "Fig. 14 from the store", caption)
            + table.to_html(index=False, border=0),
            f"![Fig. 14]({figures.name}/fig14.png)\n\n{caption}\n\n{to_markdown(table)}\n")


def _heatmaps(store: Store, figures: Path, report: Report) -> tuple[str, str]:
    pairs = heatmap_pairs(store)
    if not pairs:
        return "<p>The store holds no matrix cells.</p>", "The store holds no matrix cells.\n"
    parts, markdown = [], []
    for protocol, attack in pairs:
        title = f"{protocol}: {attack}"
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"heatmap_{protocol}_{attack}")
        columns = column_label(protocol)
        figure = draw_heatmap(heatmap_grid(store, protocol, attack), f"{title} - defense rate (%)", columns)
        parts.append(_figure(_save(figure, figures, name), f"heatmap of {title}",
                             f"{title}: targets x {columns}s, defense rate in %, cells with several limits pooled."))
        markdown.append(f"![{title}]({figures.name}/{name}.png)\n")
    report.heatmaps = len(pairs)
    return "".join(parts), "\n".join(markdown)


def _gallery(store: Store, data: str | None, data_dir: str | None, images: int, figures: Path,
             report: Report) -> tuple[str, str]:
    if data is None:
        text = ("The galleries craft adversarials of a few test images on the fly: rerun with --data SPEC "
                "(the data set the store's models were trained on, e.g. --data folder:../shared/data/cifar10-jpeg, "
                "and --data-dir DIR for its cache) to include them.")
        return f"<p>{html.escape(text)}</p>", text + "\n"
    gallery = make_gallery(store, data, data_dir, n=images)
    report.gallery_rows, report.gallery_sources = len(gallery.rows), len(gallery.sources)
    if not gallery.rows:
        text = ("The store has no black-box cells whose source was trained on this data set: no adversarials to show."
                if not gallery.sources else "No test image is classified correctly by every model the gallery shows.")
        return f"<p>{html.escape(text)}</p>", text + "\n"
    targets = " and ".join(name for _, name in gallery.targets)
    text = (f"{len(gallery.rows)} clean test images that every model shown classifies correctly (of the first few, "
            f"those whose attacks fool the most sources) and their {gallery.setting} adversarials from each source, "
            f"crafted now on the CPU; under each, what {targets} predict (red: wrong).")
    _save(draw_gallery(gallery), figures, "gallery")
    return (f'<p class="note">{html.escape(text)}</p>{gallery_html(gallery)}',
            f"{text}\n\n![gallery]({figures.name}/gallery.png)\n")


def build(store: Store, figures: Path, *, data: str | None = None, data_dir: str | None = None,
          images: int = IMAGES) -> Report:
    """Every section of the report from ``store``; figures are written under ``figures``."""
    with store.snapshot():  # every heatmap and table reads the same tables: list them once
        return _build(store, figures, data=data, data_dir=data_dir, images=images)


def _build(store: Store, figures: Path, *, data: str | None, data_dir: str | None, images: int) -> Report:
    report = Report()
    filled = fill_tables(store)
    report.tables = [f.table.title for f in filled]
    models = store.models()
    sections = [("models", "Models", *_models(store)), ("fig14", "Fig. 14", *_fig14(store, figures, report))]
    sections += [(f.table.key, f"{f.table.title} (paper vs ours)", table_html(f), table_markdown(f)) for f in filled]
    if not filled:
        text = "The store fills no cell of the paper's tables (Tables 1, 4-12)."
        sections.append(("tables", "Paper tables", f"<p>{text}</p>", text + "\n"))
    sections.append(("heatmaps", "The attack matrix", *_heatmaps(store, figures, report)))
    sections.append(("gallery", "Galleries (Fig. 1, Fig. 12)", *_gallery(store, data, data_dir, images, figures,
                                                                          report)))
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    versions = ", ".join(sorted(models["code_version"].dropna().unique())) or "-"
    facts = (f"Store {store.uri}: {len(models)} models, {len(store.matrix())} matrix cells, "
             f"{len(store.ensembles())} ensembles; made by rm_sweep {versions}; report written {when}.")
    intro = f'<p class="note">{html.escape(facts)}</p><p class="note">{html.escape(LEGEND)}</p>'
    report.html = page("rm_sweep report: Random Mask, the paper and this store", intro,
                       [(anchor, heading, body) for anchor, heading, body, _ in sections])
    report.markdown = "\n".join([f"# rm_sweep report\n\n{facts}\n\n{LEGEND}\n",
                                 *(f"## {heading}\n\n{text}" for _, heading, _, text in sections)])
    report.latex = "\n".join(["% rm_sweep report: the paper's tables with this store's numbers.",
                              "% Needs \\usepackage{booktabs}.", *(table_latex(f) for f in filled)])
    return report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser("python -m rm_sweep.report", __doc__.split("\n\n")[0].split(": ", 1)[1])
    cli.add_store(parser)
    parser.add_argument("--out", default="report.html",
                        help="the HTML file (default report.html); .md, _tables.tex and _figures/ are written beside it")
    cli.add_data(parser, "the data set the store's models were trained on, for the galleries")
    parser.add_argument("--images", type=cli.count(), default=IMAGES,
                        help=f"test images in the gallery (default {IMAGES})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out, markdown, latex, figures = output_paths(args.out)
    if args.data is not None:
        parse_data_spec(args.data)
    store = cli.existing_store(args.store)
    # Figures are drawn into a staging folder and copied beside --out once the whole report is
    # made, so a report that fails half way (a --data that is not the models', a damaged store
    # file) leaves no files behind. Each is written atomically: the staging folder may be on
    # another file system, where a move would write over the old figure while a browser reads it.
    with tempfile.TemporaryDirectory(prefix="rm_sweep-report-") as staging:
        staged = Path(staging) / figures.name
        report = build(store, staged, data=args.data, data_dir=args.data_dir, images=args.images)
        out.parent.mkdir(parents=True, exist_ok=True)
        if staged.is_dir():
            figures.mkdir(exist_ok=True)
            for path in staged.iterdir():
                atomic_write_bytes(figures / path.name, path.read_bytes())
    for path, text in ((out, report.html), (markdown, report.markdown), (latex, report.latex)):
        atomic_write_bytes(path, text.encode())
    gallery = (f"{report.gallery_rows} image(s) x {report.gallery_sources} source(s)" if report.gallery_rows
               else "none (give --data)" if args.data is None else "no images")
    print(f"{out}: Fig. 14 {'drawn' if report.fig14 else 'not in the store'}; {len(report.tables)} paper table(s)"
          f"{' (' + ', '.join(report.tables) + ')' if report.tables else ''}; {report.heatmaps} heatmap(s); "
          f"gallery {gallery}")
    print(f"beside it: {markdown}, {latex}, {figures}/")
    return 0


__all__ = ["Report", "build", "main", "output_paths"]

if __name__ == "__main__":
    cli_main(main)
