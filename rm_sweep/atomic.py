"""Atomic file writes: a reader (or a resumed run) never sees half a file, and the file gets the
permissions the writer's umask gives any new file (a store shared by a group stays readable)."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from rm_sweep.errors import UserError


def umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only be read by setting
    it, which races with threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): the classic read
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def cannot_write_in(directory: str | os.PathLike) -> str | None:
    """None if this process can create files in ``directory`` (an existing directory), else
    why not in the OS's words: a hidden probe file is created and deleted, which, unlike
    ``os.access``, answers for ACLs, read-only mounts and root without its capabilities."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".rm_sweep-probe-")
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    os.unlink(probe)
    return None


def cannot_create(directory: str | os.PathLike) -> str | None:
    """None if this process could create ``directory`` (with its parents) or write in it, else
    why not, in one phrase naming the folder at fault. Nothing is created: creating it would
    write in the nearest existing folder above it, so that one is probed (``cannot_write_in``)."""
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    reason = cannot_write_in(existing)
    return None if reason is None else f"cannot write in {existing} ({reason})"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    ``tempfile.mkstemp`` creates its file 0600 (private to the writer); it is given the mode a
    plain ``open()`` would have before the rename, so group members read what anyone writes.
    A symbolic link keeps its place: the file it names is replaced. A device or a pipe
    (``/dev/stdout``, ``/dev/null``) is written straight to, never replaced by a file.

    Raises:
        UserError: a device or pipe refused the data (``/dev/full``).
    """
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        try:
            with open(path, "wb") as stream:
                stream.write(data)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or type(exc).__name__}") from None
        return
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), file_mode())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch  # here, not at the top: the command-line layer imports this module and starts without torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
