"""Shared pytest fixtures: data, Ray instances (plain and with a fault armed), an S3 server, a
multi-node cluster."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from s3server import S3Server, moto_s3

if TYPE_CHECKING:
    from multinode import MultiNodeCluster


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


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_uri")


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


class Faults:
    """The faults armed in a local Ray instance (``rm_sweep.orchestration.faults``), each disarmed
    until a test arms it: a target actor's call (``call``), a Train worker after epoch 2 (``epoch``)."""

    ENTRIES = {"call": "call:count", "epoch": "epoch:*/2"}

    def __init__(self, directory: Path) -> None:
        self.markers = {point: directory / point for point in self.ENTRIES}
        for marker in self.markers.values():
            marker.touch()

    @property
    def env(self) -> dict[str, str]:
        from rm_sweep.orchestration import faults

        return {faults.ENV: ";".join(f"{entry}:{self.markers[p]}" for p, entry in self.ENTRIES.items())}

    def arm(self, point: str) -> Path:
        """Arm fault ``point``; returns its marker, which exists again once the fault has struck."""
        self.markers[point].unlink()
        return self.markers[point]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    """One private 2-CPU Ray instance for the module (the pipeline uses it instead of starting its
    own), with the recovery tests' faults in place, disarmed."""
    pytest.importorskip("ray")
    from rm_sweep.orchestration.session import ray_session

    faults = Faults(tmp_path_factory.mktemp("faults"))
    with ray_session(num_cpus=2, env=faults.env):
        yield faults


@pytest.fixture(scope="module")
def multinode(s3_server: S3Server) -> Iterator[MultiNodeCluster]:
    """Head (0 CPUs) + two 1-CPU worker raylets on this machine, joined by this driver; they inherit
    the S3 credentials from the environment."""
    from multinode import start_cluster

    with start_cluster(s3_server) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: on shared CPUs two threads that wait on each other run several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar(cifar_folder: Path) -> dict:
    """2000 training and 300 test CIFAR-10 images (test ones as floats in [0, 1])."""
    from attack_models import load_cifar

    train_x, train_y = load_cifar(cifar_folder / "train", 200)
    test_x, test_y = load_cifar(cifar_folder / "test", 30)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x.float() / 255, "test_y": test_y}


@pytest.fixture(scope="session")
def trained(cifar: dict):
    """A ``TinyCNN`` trained for a few seconds on ``cifar`` (~37 % test accuracy)."""
    from attack_models import train_tiny_cnn

    return train_tiny_cnn(cifar)


@pytest.fixture(scope="session")
def correct(trained, cifar: dict) -> tuple:
    """Test images the trained model classifies correctly (the paper attacks only those)."""
    import torch

    with torch.no_grad():
        ok = trained(cifar["test_x"]).argmax(1) == cifar["test_y"]
    return cifar["test_x"][ok], cifar["test_y"][ok]
