"""Shared pytest fixtures."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from s3server import S3Server, moto_s3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 with one bucket, for the whole session.

    Its dummy credentials are put into `os.environ` while it runs, so pyarrow in this process and
    Ray nodes started afterwards (they inherit the environment) can reach it.
    """
    with moto_s3() as server, pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        yield server


@pytest.fixture
def s3_uri(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """An `s3://` URI (endpoint in its query) under a prefix no other test uses."""
    return s3_server.uri(re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name))


@pytest.fixture(scope="session")
def cifar_folder() -> Path:
    """The shared CIFAR-10 JPEG ImageFolder (../shared/data/cifar10-jpeg beside the repository)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
    if not (path / "train").is_dir():
        pytest.skip(f"{path} is not available")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the session, so cached decoded arrays are built once."""
    return tmp_path_factory.mktemp("data")
