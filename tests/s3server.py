"""A throwaway S3-compatible server (moto) on 127.0.0.1 for tests of `s3://` stores and Ray storage.

`moto_s3()` starts `python -m moto.server` on a free loopback port as a subprocess, creates one
bucket, yields an `S3Server`, and stops the process at the end. Everything that talks to it
(pyarrow in this process, Ray raylets and workers started later) needs the dummy credentials in
`S3Server.env`; the pytest fixture in `conftest.py` puts them into `os.environ` for that reason.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

import pyarrow.fs

# Any values work against moto; real ones must never appear in tests or config files.
_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Without this the AWS SDK probes the EC2 metadata service for credentials and a region,
    # which costs seconds of timeouts on a machine that is not an EC2 instance.
    "AWS_EC2_METADATA_DISABLED": "true",
}
_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class S3Server:
    """A running moto server holding one bucket.

    Attributes:
        endpoint: "127.0.0.1:PORT", what pyarrow calls `endpoint_override`.
        bucket: the bucket created at start (3+ characters, no underscore).
        env: environment variables every client process needs (dummy credentials, region).
    """

    endpoint: str
    bucket: str
    env: dict[str, str] = field(default_factory=lambda: dict(_DUMMY_ENV))

    def uri(self, prefix: str = "") -> str:
        """`s3://bucket/prefix?endpoint_override=...&scheme=http`: a URI pyarrow and Ray resolve alone."""
        path = f"{self.bucket}/{prefix.strip('/')}".rstrip("/")
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http"

    def filesystem(self) -> pyarrow.fs.S3FileSystem:
        """A pyarrow filesystem on this server; paths on it are "bucket/key"."""
        return pyarrow.fs.S3FileSystem(
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            session_token=self.env["AWS_SESSION_TOKEN"],
            region=self.env["AWS_REGION"],
            endpoint_override=self.endpoint,
            scheme="http",
            allow_bucket_creation=True,
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` in the bucket, relative to the bucket, sorted."""
        base = f"{self.bucket}/{prefix.strip('/')}".rstrip("/")
        selector = pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self.filesystem().get_file_info(selector)
        return sorted(
            info.path[len(self.bucket) + 1 :] for info in infos if info.type == pyarrow.fs.FileType.File
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, endpoint: str, log: IO[str]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto server exited with status {proc.returncode}: {log.read()[-2000:]}")
        try:
            # moto answers every path; any HTTP answer means the server is listening.
            urllib.request.urlopen(f"http://{endpoint}/moto-api/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer on {endpoint} within {_START_TIMEOUT_S:.0f} s")


@contextmanager
def moto_s3(bucket: str = "rm-sweep-test") -> Iterator[S3Server]:
    """Run a moto S3 server on a free 127.0.0.1 port with `bucket` created; stop it on exit.

    Raises:
        RuntimeError: moto is not installed (`pip install -e '.[test]'`) or the server did not start.
    """
    if importlib.util.find_spec("moto") is None:
        raise RuntimeError("moto is not installed: pip install 'moto[server]' (the test extra)")
    port = _free_port()
    endpoint = f"127.0.0.1:{port}"
    # The server logs every request: a file, not a pipe nobody reads, so it never blocks on a full pipe.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **_DUMMY_ENV},
    )
    try:
        _wait_until_up(proc, endpoint, log)
        server = S3Server(endpoint=endpoint, bucket=bucket)
        server.filesystem().create_dir(bucket)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
