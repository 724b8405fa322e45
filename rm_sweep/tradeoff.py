"""``python -m rm_sweep.tradeoff``: the paper's Fig. 14, end to end.

    python -m rm_sweep.tradeoff --data folder:../shared/data/cifar10-jpeg

Trains the search space's missing models (the sweep), computes its missing attack-matrix cells
(the matrix), both on a local Ray instance with this machine's CPUs (or ``--address auto``), then
draws clean accuracy and black-box defense rate (FGSM and PGD in Madry et al.'s setting, from a
normal ResNet-18) against the shallow drop ratio as PNG and SVG, and prints the same numbers.
What the store already holds is reused: a second run draws from the store without starting Ray.
The paper's points are overlaid when the space's models are trained as the paper's were.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

import rm_sweep
from rm_sweep import cli, pipeline
from rm_sweep.errors import UserError, cli_main
from rm_sweep.figures import check_png_path, draw_fig14, fig14_cells, fig14_rows, fig14_summary, is_paper_setting
from rm_sweep.paper_results import fig14_points
from rm_sweep.spaces import load_space
from rm_sweep.store import Store

QUICK = Path("search_spaces") / "quick.yaml"


def default_space() -> Path:
    """``search_spaces/quick.yaml`` in the working directory, else in the checkout the package runs from."""
    if QUICK.exists():
        return QUICK
    return Path(rm_sweep.__file__).resolve().parent.parent / QUICK


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser("python -m rm_sweep.tradeoff", __doc__.split("\n\n")[0])
    parser.add_argument("--space", default=None, help=f"search space file (default: {QUICK})")
    cli.add_pipeline(parser)
    parser.add_argument("--out", default="fig14.png", help="figure file (PNG; an SVG is written beside it)")
    parser.add_argument("--paper", choices=("auto", "on", "off"), default="auto",
                        help="overlay the paper's points: auto = only when the space trains models as the paper "
                             "did (full CIFAR-10, width 1, the paper's recipe)")
    return parser.parse_args(argv)


def table(summary: pd.DataFrame, paper: pd.DataFrame | None) -> pd.DataFrame:
    """One row per shallow ratio: models, then ``mean ± std`` (percent) per metric, then the
    paper's values when given."""
    wide = summary.pivot(index="shallow_ratio", columns="metric", values=["mean", "std", "n"])
    out = pd.DataFrame(index=wide.index)
    out["models"] = wide[("n", "clean_accuracy")].astype(int)
    names = {"clean_accuracy": "clean acc %", "madry_fgsm": "FGSM defense %", "madry_pgd": "PGD defense %"}
    for metric, name in names.items():
        if ("mean", metric) in wide:
            out[name] = [f"{m:.2f} ± {s:.2f}" if pd.notna(m) else "" for m, s in
                         zip(wide[("mean", metric)], wide[("std", metric)])]
    if paper is not None:
        for metric, name in names.items():
            values = paper[paper["metric"] == metric].set_index("shallow_ratio")["value"]
            out[f"paper {name.split(' %')[0]}"] = [f"{values[r]:.2f}" if r in values.index else ""
                                                    for r in out.index]
    out.index.name = "shallow ratio"
    return out


def headline(summary: pd.DataFrame) -> list[str]:
    """The paper's effect in one line per attack: the most masked model against the normal one."""
    lines = []
    for metric, name in (("madry_fgsm", "FGSM"), ("madry_pgd", "PGD")):
        values = summary[summary["metric"] == metric].set_index("shallow_ratio")["mean"]
        if 0.0 in values.index and len(values) > 1:
            top = values.index.max()
            gap = values[top] - values[0.0]
            verdict = "above" if gap > 0 else "not above"
            lines.append(f"{name} defense: {top:g}-Shallow {values[top]:.2f} % vs normal {values[0.0]:.2f} % "
                         f"({gap:+.2f} points: {verdict} the normal model's)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    space_path = Path(args.space) if args.space else default_space()
    space = load_space(space_path, data=args.data)
    store = Store(args.store)
    check_png_path(cli.output_file(args.out, make_parent=True))  # before hours of work, not after
    if not fig14_cells(space):
        raise UserError(f"{space_path}: no Fig. 14 cells (black-box madry_fgsm / madry_pgd from a normal resnet18 "
                        "onto resnet18 targets with shallow masks); see search_spaces/fig14.yaml")
    done = pipeline.complete(space, store, address=args.address, data_dir=args.data_dir)
    cli.print_damaged(done.damaged, trained=True)
    rows = fig14_rows(store, space)
    summary = fig14_summary(rows)
    paper_scale = is_paper_setting(store, rows)
    overlay = args.paper == "on" or (args.paper == "auto" and paper_scale)
    paper = fig14_points() if overlay else None
    draw_fig14(summary, args.out, paper=paper,
               title=f"Fig. 14 ({space.name}): ResNet-18 with shallow Random Mask, black-box from a normal ResNet-18")

    if done.started_ray:
        matrix = done.matrix
        cells = f"{matrix.cells} matrix cells" if matrix is not None else "no matrix cells"
        print(f"\ncomputed: {done.models_trained} model(s) trained, {cells} added, in {done.seconds:.0f} s")
    else:
        print(f"\neverything was in {store.uri}: nothing trained or attacked (Ray not started)")
    print(f"\nFig. 14 ({space.name}), mean ± std over seeds, defense rates against a normal ResNet-18's "
          "adversarials (Madry's black-box setting, eps 8/255):")
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table(summary, paper).to_string())
    print()
    for line in headline(summary):
        print(line)
    if not paper_scale:
        print("\nNote: this space is a small demo, not the paper's training (full CIFAR-10, width 1, 350 epochs). "
              "It shows robustness - black-box defense rising with the shallow drop ratio - not the accuracy "
              "trade-off: every model here is far from its full-training accuracy (the paper's 84-95 %), so its "
              "clean accuracy says little about what masking costs at full size. "
              + ("The paper's points are overlaid for reference only (--paper on)." if overlay else
                 "The paper's points are not overlaid (use --paper on to overlay them anyway)."))
    print(f"\nfigure: {args.out} and {Path(args.out).with_suffix('.svg')}; store: {store.uri}")
    return 0


if __name__ == "__main__":
    cli_main(main)
