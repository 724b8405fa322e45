"""A directory, local or on S3 (or Google Cloud Storage), whose every file operation fails in one line.

``rm_sweep.store.Store`` keeps its tables and checkpoints in one, ``rm_sweep.leases`` its leases.
Errors name the directory and what failed; a file that cannot be read says why without advising
to delete it (``rm_sweep.errors.cannot_read``); an ``s3://`` endpoint that cannot be reached is
named (``gs://`` too). Local files are written atomically with the permissions the writer's umask gives.
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

from rm_sweep.atomic import atomic_write_bytes, cannot_create
from rm_sweep.errors import UserError, cannot_read
from rm_sweep.uris import GCS_SCHEMES, is_uri, resolve_uri


class Storage:
    """The directory at ``uri``: a local path (created on first write) or an ``s3://`` URI."""

    def __init__(self, uri: str) -> None:
        if not uri:
            raise UserError("the store needs a location: a directory or an s3:// URI")
        self.uri = uri
        self.fs, root = resolve_uri(uri)
        parts = urlsplit(uri) if is_uri(uri) else None
        self.scheme = parts.scheme if parts else ""
        self.query = f"?{parts.query}" if parts and parts.query else ""
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        if not self.local and not self.root:
            raise UserError(f"store {uri}: name a bucket (s3://BUCKET/PREFIX)")
        if self.local and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise UserError(f"store {uri} is a file; a store is a directory (or an s3:// URI)")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def display(self, path: str) -> str:
        """``path`` as a user would name it (with the scheme for S3)."""
        return path if self.local else f"{self.scheme}://{path}"

    @contextlib.contextmanager
    def errors(self, action: str, *, reading: str | None = None) -> Iterator[None]:
        """Turn a filesystem error into one line naming the store and ``action``; with
        ``reading`` (what is read), a file that may not be read is named as such."""
        try:
            yield
        except OSError as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if reading is not None and isinstance(exc, (PermissionError, IsADirectoryError)):
                raise cannot_read(reading, exc) from None
            if not self.local and any(mark in text for mark in ("NETWORK_CONNECTION", "curlCode", "CURL error")):
                raise UserError(f"store {self.uri}: cannot reach the endpoint {self.endpoint()} "
                                f"({_network_reason(text)})") from None
            reason = "Permission denied" if isinstance(exc, PermissionError) else exc.strerror or text
            raise UserError(f"store {self.uri}: cannot {action}: {reason}") from None

    def endpoint(self) -> str:
        """The endpoint requests go to: the URI's ``endpoint_override``; for S3 the AWS
        environment's, else AWS's own; for ``gs://`` Google's."""
        override = parse_qs(self.query.lstrip("?")).get("endpoint_override")
        if override:
            return override[0]
        if self.scheme in GCS_SCHEMES:
            return "of Google Cloud Storage"
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "of AWS S3"

    def info(self, path: str) -> pafs.FileInfo:
        with self.errors(f"read {self.display(path)}"):
            return self.fs.get_file_info(path)

    def listing(self, directory: str) -> list[pafs.FileInfo]:
        """The entries of ``directory`` (none if it does not exist), sorted by path."""
        selector = pafs.FileSelector(directory, allow_not_found=True)
        with self.errors(f"list {self.display(directory)}"):
            return sorted(self.fs.get_file_info(selector), key=lambda i: i.path)

    def read(self, path: str, what: str, *, missing_ok: bool = False) -> bytes | None:
        """The content of the file at ``path`` (``what`` names it in errors); None if it does not
        exist and ``missing_ok`` (a file another process may delete at any time)."""
        with self.errors(f"read {what}", reading=what):
            try:
                with self.fs.open_input_stream(path) as f:
                    return f.read()
            except FileNotFoundError:
                if missing_ok:
                    return None
                raise

    def write(self, path: str, data: bytes) -> None:
        """Write ``data`` so readers see the whole file or none of it: locally a temporary file
        renamed into place, on S3 one upload (S3 shows an object only once complete)."""
        with self.errors(f"write {self.display(path)}"):
            if self.local:
                atomic_write_bytes(path, data)
            else:
                with self.fs.open_output_stream(path) as f:
                    f.write(data)

    def delete(self, path: str) -> None:
        """Delete the file or directory at ``path`` if it exists."""
        with self.errors(f"delete {self.display(path)}"):
            kind = self.fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                self.fs.delete_dir(path)
            elif kind == pafs.FileType.File:
                self.fs.delete_file(path)

    def check_writable(self) -> None:
        """Fail now, in one line, unless this process can write here: a hidden probe file is
        written and deleted (locally in the nearest existing folder, ``atomic.cannot_create``,
        so that nothing is created)."""
        if self.local:
            problem = cannot_create(self.root if is_uri(self.uri) else self.uri)  # the folder as the user named it
            if problem is not None:
                raise UserError(f"store {self.uri}: {problem}")
            return
        probe = self.path(f".rm_sweep-probe-{uuid.uuid4().hex}")
        with self.errors("write"):
            with self.fs.open_output_stream(probe) as f:
                f.write(b"")
            self.fs.delete_file(probe)


def _network_reason(text: str) -> str:
    """The cause in a network error's text: Google's client nests it in a page-long status, as
    ``CURL error [6]=Could not resolve hostname``; S3's text is short and kept whole."""
    found = re.findall(r"CURL error \[\d+\]=([^{}]+?)(?= error_info=|\}|$)", text)
    return f"CURL error: {found[-1].strip()}" if found else text


__all__ = ["Storage"]
