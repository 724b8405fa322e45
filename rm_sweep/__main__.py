"""``rm-sweep COMMAND ...`` (or ``python -m rm_sweep COMMAND ...``): every command behind one name.

    rm-sweep tradeoff --data folder:../shared/data/cifar10-jpeg
    rm-sweep query pivot --setting madry_pgd --format latex
    rm-sweep sweep --help                  # a command's own help

Each command is a module with ``main(argv)`` (``python -m rm_sweep.sweep`` runs the same one);
only the chosen module is imported, so ``rm-sweep --help`` loads neither torch nor pandas, and
``rm-sweep query`` neither the training code nor Ray.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from rm_sweep import __version__, checks, cli
from rm_sweep.errors import UserError, cli_main

# Command -> (module whose main(argv) runs it, what it does in one line).
COMMANDS = {
    "train": ("rm_sweep.train", "train one model (no Ray), resumable"),
    "sweep": ("rm_sweep.sweep", "train every model of a search space the store lacks (Ray Tune + Ray Train)"),
    "matrix": ("rm_sweep.matrix", "compute every attack-matrix cell of a search space the store lacks"),
    "tradeoff": ("rm_sweep.tradeoff", "the paper's Fig. 14 end to end: sweep, matrix, figure and table"),
    "query": ("rm_sweep.query", "read the store: tables, filters, the paper's pivot layout, SQL"),
    "report": ("rm_sweep.report", "one self-contained HTML page of what the store holds, beside the paper"),
}


def _parser() -> cli.Parser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items())
    p = cli.parser("rm-sweep", "Random Mask sweeps, attack matrices and figures, one command per step.")
    p.epilog = f"commands:\n{listing}\n\nrm-sweep COMMAND --help shows a command's options."
    p.add_argument("--version", action="version", version=f"rm-sweep {__version__}")
    p.add_argument("command", metavar="COMMAND", help="one of the commands below")
    # Everything after the command is the command's, --help included.
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (rm-sweep COMMAND --help)")
    return p


def main(argv: list[str] | None = None) -> int | None:
    """Run ``argv[0]``'s module with the rest of ``argv``; its exit status is returned."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise UserError(f"rm-sweep: name a command: {', '.join(COMMANDS)} (see --help)")
    args = _parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[checks.choice(args.command, COMMANDS, "command")][0])
    return module.main(args.args)


def run() -> NoReturn:
    """The ``rm-sweep`` console script: ``main`` with one-line errors and exit status 2."""
    cli_main(main)


if __name__ == "__main__":
    run()
