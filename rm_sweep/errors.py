"""User-facing errors: one line, non-zero exit, never a traceback."""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn


class UserError(ValueError):
    """Bad input a user can fix: the message names the problem in one line."""


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
