"""Locations as text: a local path or a URI that ``pyarrow.fs`` resolves (``s3://bucket/key?options``).

The store's root, and every checkpoint URI its ``models`` table records, go through
``resolve_uri``: one rule for what a location means, shared by the store and the model loader
(which must not import the store).
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from rm_sweep.errors import UserError


def default_store_uri() -> str:
    """``$RM_SWEEP_STORE`` or ``store`` (a directory in the working directory)."""
    return os.environ.get("RM_SWEEP_STORE") or "store"


def is_uri(location: str) -> bool:
    """Whether ``location`` names a scheme (``s3://...``) rather than a local path."""
    return "://" in location


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a local path or a URI (``s3://bucket/key?options``).

    A local path is made absolute (``~`` expanded). For S3, credentials, region and endpoint
    come from the URI's query or the environment (``AWS_ENDPOINT_URL`` included), as pyarrow
    reads them.
    """
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{uri}: {str(exc).splitlines()[0]}") from None


def read_bytes(uri: str, what: str = "file") -> bytes:
    """The whole file at ``uri`` (a local path or a URI); a ``UserError`` naming it as ``what``
    (``checkpoint s3://... does not exist``) if it is not a file or cannot be read."""
    filesystem, path = resolve_uri(uri)
    try:
        if filesystem.get_file_info(path).type != pafs.FileType.File:
            raise UserError(f"{what} {uri} does not exist")
        with filesystem.open_input_stream(path) as f:
            return f.read()
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"cannot read {what} {uri}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


__all__ = ["default_store_uri", "is_uri", "read_bytes", "resolve_uri"]
