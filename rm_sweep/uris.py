"""Locations as text: a local path or a URI that ``pyarrow.fs`` resolves (``s3://bucket/key?options``).

The store's root, and every checkpoint URI its ``models`` table records, go through
``resolve_uri``: one rule for what a location means, shared by the store and the model loader
(which must not import the store).
"""
from __future__ import annotations

import os
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from rm_sweep.errors import UserError

# pyarrow retries a failed Google Cloud Storage request for 15 minutes, so a gs:// store on a
# machine without a network would seem to hang. Transient errors are still retried this long.
GCS_RETRY_SECONDS = 30
GCS_SCHEMES = ("gs", "gcs")  # pyarrow's names for Google Cloud Storage


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
    reads them. A ``gs://`` URI retries for ``GCS_RETRY_SECONDS`` unless its query sets
    ``retry_limit_seconds``.
    """
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    parts = urlsplit(uri)
    if parts.scheme in GCS_SCHEMES and "retry_limit_seconds" not in parse_qs(parts.query):
        uri = parts._replace(query="&".join(filter(None, [parts.query, f"retry_limit_seconds={GCS_RETRY_SECONDS}"]))).geturl()
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


__all__ = ["GCS_RETRY_SECONDS", "GCS_SCHEMES", "default_store_uri", "is_uri", "read_bytes", "resolve_uri"]
