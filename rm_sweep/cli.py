"""What every command shares: one-line argument errors and the store, cluster and data flags."""
from __future__ import annotations

import argparse
import importlib.util
import os
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rm_sweep import checks
from rm_sweep.atomic import cannot_create
from rm_sweep.errors import UserError
from rm_sweep.uris import default_store_uri

if TYPE_CHECKING:
    import pandas as pd

    from rm_sweep.spaces import SearchSpace
    from rm_sweep.store import Store


class Parser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line (``error: ...``, exit status 2, via ``cli_main``)
    instead of a usage block followed by the message."""

    def error(self, message: str) -> Any:
        raise UserError(f"{self.prog}: {message} (see --help)")


def parser(prog: str, description: str) -> Parser:
    return Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def count(maximum: int = checks.INT64_MAX) -> Callable[[str], int]:
    """An argparse type: a positive integer (at most ``maximum``)."""
    return _type(int, lambda value, name: checks.positive_int(value, name, maximum))


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


def default_address() -> str | None:
    """The Ray cluster a command joins without ``--address``: ``$RAY_ADDRESS`` when set and not
    empty, as ``ray.init`` reads it (``ray job submit`` sets it to the cluster for a job's
    driver); None otherwise, which means a private local Ray instance."""
    return os.environ.get("RAY_ADDRESS") or None


def _address(text: str) -> str | None:
    """An argparse type: a Ray address; ``local`` (Ray's word for "start one here") is None, the
    private local instance, whether it comes from ``--address`` or ``$RAY_ADDRESS``."""
    return None if text == "local" else text


def add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=default_address(), type=_address,
                   help="Ray cluster to join (auto, HOST:6379, ray://HOST:10001) or local; default: $RAY_ADDRESS "
                        "when set (ray job submit sets it for a job), else local: a private Ray instance with this "
                        "machine's CPUs, on the loopback interface")


def add_data(p: argparse.ArgumentParser, data_help: str = "override the space's data set") -> None:
    """``--data`` (its help: ``data_help``, then the forms a spec takes) and ``--data-dir``."""
    p.add_argument("--data", default=None, help=f"{data_help}: cifar10, mnist or folder:PATH")
    p.add_argument("--data-dir", default=None,
                   help="where data sets are downloaded and decoded caches kept "
                        "(default: $RM_SWEEP_DATA_DIR or ~/.cache/rm_sweep)")


def print_table(frame: pd.DataFrame) -> None:
    """Print a status table (models, cells): no index, missing values as ``-``, 4 digits."""
    print(frame.to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.4g}") if len(frame) else "(none)")


def output_file(text: str, flag: str = "--out", *, make_parent: bool = False) -> Path:
    """A file a command will write: not a directory, in a directory that exists (or, with
    ``make_parent``, can be created) and that this process may write in (a probe file is
    created and deleted). Checked before any work, so a typo costs a second, not a run."""
    path = Path(text)
    if path.is_dir():
        raise UserError(f"{flag} {text} is a directory; give a file name")
    if path.exists() and not path.is_file():  # a device or a pipe: written to, not replaced
        if not os.access(path, os.W_OK):
            raise UserError(f"{flag} {text}: cannot write to it (Permission denied)")
        return path
    if not make_parent and not path.parent.exists():
        raise UserError(f"{flag} {text}: {path.parent} does not exist")
    problem = cannot_create(path.parent)
    if problem is not None:
        raise UserError(f"{flag} {text}: {problem}")
    return path


def written_beside(out: Path, files: Iterable[Path] = (), dirs: Iterable[Path] = (), flag: str = "--out") -> None:
    """The files and directories a command writes beside (or in) ``out``: a directory where one
    of ``files`` goes, or a file where one of ``dirs`` goes, is refused before any work, not
    found when the last of several outputs is written."""
    for path in files:
        if path.is_dir():
            raise UserError(f"{flag} {out}: {path}, written with it, is a directory")
    for path in dirs:
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {out}: {path}, written with it, is a file; it names a directory")


def output_dir(text: str, holds: str, flag: str = "--out") -> Path:
    """A directory a command will create (with its parents) or write into, ``holds`` saying what
    for: not a file, and this process may write where it is or would be created. Checked
    before any work."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {text} is a file; it names {holds}")
    problem = cannot_create(path)
    if problem is not None:
        raise UserError(f"{flag} {text}: {problem}")
    return path


def print_damaged(damaged: Mapping[str, str], *, trained: bool) -> None:
    """One line per stored model whose checkpoint is missing or damaged (``Store.unusable``):
    such a model counts as missing."""
    then = "it counted as missing and was trained again" if trained else \
        "it counts as missing: the next sweep trains it again"
    for model_id, reason in damaged.items():
        print(f"model {model_id}: {reason}; {then}")


def add_pipeline(p: argparse.ArgumentParser) -> None:
    """The flags of every command that fills a store from a search space: store, cluster, data,
    console output (``--quiet``/``--verbose``, read with ``verbosity``) and ``--mlflow``."""
    add_store(p)
    add_cluster(p)
    add_data(p)
    output = p.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true", help="no progress bars")
    output.add_argument("--verbose", action="store_true",
                        help="Ray's own output too: Tune's table of trials and every line Ray's processes print "
                             "(otherwise they stay in Ray's session folder, /tmp/ray/session_latest/logs)")
    p.add_argument("--mlflow", default=None, metavar="URI", type=mlflow_uri,
                   help="also log each trial's model spec and per-epoch metrics to this MLflow tracking URI "
                        "(e.g. file:./mlruns; needs pip install 'rm_sweep[mlflow]'); the store stays the source "
                        "of truth")


def mlflow_uri(text: str) -> str:
    """An MLflow tracking URI, accepted only where MLflow is installed and, for a local one (a
    path or ``file:``), where this user may write (MLflow would fail only once Ray runs)."""
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme in ("", "file"):
        problem = cannot_create(Path(parsed.path if parsed.scheme else text))
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
    if importlib.util.find_spec("mlflow") is None:
        raise argparse.ArgumentTypeError("MLflow is not installed: pip install 'rm_sweep[mlflow]'")
    return text


def space_and_store(args: argparse.Namespace) -> tuple[SearchSpace, Store]:
    """The search space (``args.space``, its data overridden by ``--data``) and the store
    (``--store``) of a command that fills a store from a space."""
    from rm_sweep.spaces import load_space
    from rm_sweep.store import Store

    return load_space(args.space, data=args.data), Store(args.store)


def existing_store(uri: str) -> Store:
    """The store at ``uri`` for a command that only reads it; a ``UserError`` if nothing is there."""
    from rm_sweep.store import Store

    store = Store(uri)
    if not store.exists():
        raise UserError(f"no store at {uri} (run python -m rm_sweep.tradeoff or rm_sweep.sweep first)")
    return store


def verbosity(args: argparse.Namespace) -> int:
    """0 (``--quiet``), 1 (progress bars, the default) or 2 (``--verbose``: Ray's output too)."""
    return 0 if args.quiet else 2 if args.verbose else 1


__all__ = ["Parser", "add_cluster", "add_data", "add_pipeline", "add_store", "count", "default_address", "existing_store",
           "mlflow_uri", "output_dir", "output_file", "parser", "positive", "print_damaged", "print_table", "seed",
           "space_and_store", "verbosity"]
