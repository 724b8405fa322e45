"""What every command shares: one-line argument errors and the store, cluster and data flags."""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from rm_sweep import checks
from rm_sweep.errors import UserError
from rm_sweep.store import default_store_uri


class Parser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line (``error: ...``, exit status 2, via ``cli_main``)
    instead of a usage block followed by the message."""

    def error(self, message: str) -> Any:
        raise UserError(f"{self.prog}: {message} (see --help)")


def parser(prog: str, description: str) -> Parser:
    return Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def count() -> Callable[[str], int]:
    """An argparse type: a positive integer."""
    return _type(int, checks.positive_int)


def seed() -> Callable[[str], int]:
    """An argparse type: a random seed (an integer in [0, 2**63))."""
    return _type(int, checks.seed)


def positive(*, strict: bool = True) -> Callable[[str], float]:
    """An argparse type: a positive (or, not ``strict``, non-negative) finite number."""
    return _type(float, lambda value, name: float(checks.positive(value, name, strict=strict)))


def _type(kind: type, check: Callable[[Any, str], Any]) -> Callable[[str], Any]:
    """An argparse type converting text to ``kind`` and applying ``check``; its errors become
    argparse's own, which names the flag (a ``ValueError`` would be an unnamed "invalid value")."""

    def convert(text: str) -> Any:
        try:
            return check(kind(text), "value")
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is needed, "
                                             f"got {text!r}") from None

    return convert


def add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=default_store_uri(),
                   help="store directory or s3:// URI (default: $RM_SWEEP_STORE or ./store)")


def add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster to use (auto, ray://HOST:10001); default: a private local Ray instance with "
                        "this machine's CPUs, on the loopback interface")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="override the space's data set: cifar10, mnist or folder:PATH")
    p.add_argument("--data-dir", default=None,
                   help="where data sets are downloaded and decoded caches kept "
                        "(default: $RM_SWEEP_DATA_DIR or ~/.cache/rm_sweep)")


def output_file(text: str, flag: str = "--out", *, make_parent: bool = False) -> Path:
    """A file a command will write: not a directory, in a directory that exists (or, with
    ``make_parent``, can be created). Checked before any work, so a typo costs a second."""
    path = Path(text)
    if path.is_dir():
        raise UserError(f"{flag} {text} is a directory; give a file name")
    parent = path.parent
    while make_parent and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist"
        raise UserError(f"{flag} {text}: {parent} {problem}")
    return path


def print_damaged(damaged: Mapping[str, str], *, trained: bool) -> None:
    """One line per stored model whose checkpoint is missing or damaged (``Store.unusable``):
    such a model counts as missing."""
    then = "it counted as missing and was trained again" if trained else \
        "it counts as missing: the next sweep trains it again"
    for model_id, reason in damaged.items():
        print(f"model {model_id}: {reason}; {then}")


def add_pipeline(p: argparse.ArgumentParser) -> None:
    """The flags of every command that fills a store from a search space."""
    add_store(p)
    add_cluster(p)
    add_data(p)


__all__ = ["Parser", "add_cluster", "add_data", "add_pipeline", "add_store", "count", "output_file", "parser", "positive",
           "print_damaged", "seed"]
