"""``python -m rm_sweep.tradeoff``: the paper's Fig. 14, end to end.

    python -m rm_sweep.tradeoff --data folder:../shared/data/cifar10-jpeg
    python -m rm_sweep.tradeoff --space fig14 --dry-run        # what a run would compute; starts nothing

Trains the search space's missing models (the sweep), computes its missing attack-matrix cells
(the matrix), both on a local Ray instance with this machine's CPUs (or ``--address auto``), then
draws clean accuracy and black-box defense rate (FGSM and PGD in Madry et al.'s setting, from a
normal ResNet-18) against the shallow drop ratio as PNG, SVG and PDF, and prints the same numbers.
What the store already holds is reused: a second run draws from the store without starting Ray.
The paper's points are overlaid when the stored targets were trained as the paper's were (its
recipe possibly shortened: ``figures.training_scale``).
"""
from __future__ import annotations

import argparse

import pandas as pd

from rm_sweep import cli, pipeline
from rm_sweep.errors import UserError, cli_main
from rm_sweep.figures import (
    check_png_path,
    draw_fig14,
    fig14_cells,
    fig14_rows,
    fig14_summary,
    fig14_table,
    training_scale,
)
from rm_sweep.paper_results import fig14_points
from rm_sweep.recipes import RECIPES
from rm_sweep.spaces import SearchSpace
from rm_sweep.store import Store
from rm_sweep.sweep import print_models

PAPER_EPOCHS = RECIPES["paper"].epochs

DEFAULT_SPACE = "quick"  # packaged with rm_sweep, so the default works from any directory


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser("python -m rm_sweep.tradeoff", __doc__.split("\n\n")[0])
    parser.add_argument("--space", default=DEFAULT_SPACE,
                        help=f"search space: a YAML file or a packaged name (fig14, ...; default: {DEFAULT_SPACE})")
    cli.add_pipeline(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="list the models and matrix cells a run would compute and what the store holds; "
                             "start nothing")
    parser.add_argument("--out", default="fig14.png", help="figure file (PNG; SVG and PDF copies are written beside it)")
    parser.add_argument("--paper", choices=("auto", "on", "off"), default="auto",
                        help="overlay the paper's points: auto = only when the stored targets were trained as the "
                             "paper's (full CIFAR-10, width 1, the paper's recipe, possibly with fewer epochs)")
    return parser.parse_args(argv)


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


def dry_run(space: SearchSpace, store: Store) -> None:
    """Print what a run would compute: the space's models and matrix cells, each stored or missing."""
    models, cells = pipeline.model_status(space, store), pipeline.cell_status(space, store)
    todo_models, todo_cells = (models["status"] != "stored").sum(), (cells["status"] != "stored").sum()
    print(f"{space.name}: {len(models) - todo_models} of {len(models)} models and {len(cells) - todo_cells} of "
          f"{len(cells)} matrix cells in {store.uri}; a run would train {todo_models} model(s) and compute "
          f"{todo_cells} cell(s), then draw the figure (dry run: nothing started)\n")
    print_models(models, store)
    print()
    cli.print_table(cells)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    space, store = cli.space_and_store(args)
    out = check_png_path(cli.output_file(args.out, make_parent=True))  # before hours of work, not after
    cli.written_beside(out, files=(out.with_suffix(".svg"), out.with_suffix(".pdf")))
    if not fig14_cells(space):
        raise UserError(f"{space.path}: no Fig. 14 cells (black-box madry_fgsm / madry_pgd from a normal resnet18 "
                        "onto resnet18 targets with shallow masks); see the packaged space fig14")
    if args.dry_run:
        dry_run(space, store)
        return 0
    done = pipeline.complete(space, store, address=args.address, data_dir=args.data_dir, verbose=cli.verbosity(args),
                             mlflow=args.mlflow)
    cli.print_damaged(done.damaged, trained=True)
    rows = fig14_rows(store, space)
    summary = fig14_summary(rows)
    scale = training_scale(store, rows)
    overlay = args.paper == "on" or (args.paper == "auto" and scale != "demo")
    paper = fig14_points() if overlay else None
    draw_fig14(summary, out, rows=rows, paper=paper,
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
        print(fig14_table(summary, paper).to_string())
    print()
    for line in headline(summary):
        print(line)
    if scale == "shortened":
        epochs = sorted(set(store.models().set_index("model_id").loc[rows["target_id"].unique(), "epochs"]))
        print(f"\nNote: trained as the paper's models (full CIFAR-10, width 1, its optimiser and step schedule) but "
              f"for {', '.join(map(str, epochs))} epochs instead of {PAPER_EPOCHS}, the steps at the same fractions: "
              "clean accuracy may fall a point or two short of the paper's.")
    if scale == "demo":
        print("\nNote: this space is a small demo, not the paper's training (full CIFAR-10, width 1, "
              f"{PAPER_EPOCHS} epochs). "
              "It shows robustness - black-box defense rising with the shallow drop ratio - not the accuracy "
              "trade-off: every model here is far from its full-training accuracy (the paper's 84-95 %), so its "
              "clean accuracy says little about what masking costs at full size. "
              + ("The paper's points are overlaid for reference only (--paper on)." if overlay else
                 "The paper's points are not overlaid (use --paper on to overlay them anyway)."))
    print(f"\nfigure: {out}, {out.with_suffix('.svg')} and {out.with_suffix('.pdf')}; store: {store.uri}")
    return 0


if __name__ == "__main__":
    cli_main(main)
