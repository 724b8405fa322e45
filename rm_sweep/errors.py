"""User-facing errors: one line, non-zero exit, never a traceback."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(ValueError):
    """Bad input a user can fix: the message names the problem in one line."""


def cannot_read(what: str, exc: OSError) -> UserError:
    """The error for a file that exists but cannot be read (permissions, I/O): one line that
    names it and the reason, and never advises deleting it: the file may be fine, and another
    member of the group may need it."""
    reason = exc.strerror or str(exc).splitlines()[0] or type(exc).__name__
    if isinstance(exc, PermissionError):  # pyarrow's carry a long message as their strerror
        reason = "Permission denied (its owner can make it readable to the group: chmod g+r; see docs/security.md)"
    return UserError(f"cannot read {what}: {reason}")


def cli_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run a command's `main(argv)`, turning `UserError` into `error: ...` and exit status 2.

    Ctrl-C exits with 130 and a short note, so interrupted long jobs do not print a traceback.
    Output piped into a reader that stops early (``| head``) ends the command quietly with 141,
    as a shell reports a process ended by SIGPIPE.
    """
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # Python would report the broken pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(code or 0)
