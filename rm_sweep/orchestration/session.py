"""Starting or joining Ray: one way for every command, so a sweep run inside the matrix's
session gets the same settings as a sweep run on its own."""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import ray

from rm_sweep.errors import UserError

# Ray Train's controller polls its workers every 2 s by default: a finished (or dead) worker is
# noticed up to 2 s late, which is a large share of a small model's trial. Set for the job.
JOB_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# A local instance has no node that can be preempted: Train's preemption watcher would be one
# more process started per trial (about a second of CPU on a 2-core machine) watching nothing.
LOCAL_JOB_ENV = {**JOB_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Ray 2.60 replaces a loopback node address by the machine's own (services.resolve_ip_for_localhost),
# so its GCS, raylets and workers listen on every interface, whatever --node-ip-address says.
# With "clusters" off (Ray's switch for laptops) the node address stays 127.0.0.1 and every
# server binds to loopback only. Read by the driver at call time and by every process it starts.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# A new local instance gets token authentication by default and says so in a warning on every
# start; the protection stays, the warning is kept out of the console.
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def cpu_count() -> int:
    """CPUs a local Ray instance should use: the ones this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True,
                env: Mapping[str, str] | None = None) -> Iterator[bool]:
    """Connect to the cluster at ``address`` (e.g. ``auto``), or start a private local Ray instance
    with ``num_cpus`` (default: this machine's) that listens on the loopback interface only, its
    token file private to this user (``_private_token``); shut down on exit what this call
    started. An already connected session is used as it is. Yields whether it started Ray.

    ``address="local"`` is passed explicitly for the local case: a bare ``ray.init()`` would join
    any cluster another process started on this machine. The dashboard stays on (on 127.0.0.1):
    without it Ray Train V2 cannot query its controller and each trial's shutdown stalls. Worker
    output stays in Ray's log files unless ``log_to_driver``. ``env`` adds environment variables
    to every process of the job.
    """
    if ray.is_initialized():
        yield False
        return
    settings = dict(logging_level=logging.WARNING, log_to_driver=log_to_driver)
    if address:
        reason = unreachable(address)
        if reason is not None:
            raise UserError(f"cannot connect to the Ray cluster at {address}: nothing answers there ({reason})")
        try:
            ray.init(address=address, runtime_env={"env_vars": {**JOB_ENV, **(env or {})}}, **settings)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot connect to the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    else:
        _private_token()
        with _loopback_only(), quiet_logger(_AUTH_LOGGER):
            ray.init(address="local", num_cpus=num_cpus or cpu_count(), include_dashboard=True,
                     dashboard_host="127.0.0.1", runtime_env={"env_vars": {**LOCAL_JOB_ENV, **(env or {})}},
                     **settings)
    try:
        yield True
    finally:
        ray.shutdown()


def unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at a ``HOST:PORT`` or ``ray://HOST:PORT`` Ray address (a TCP
    connection within ``timeout`` seconds), or None. ``ray.init`` waits for a GCS that does not
    answer without end (Ray 2.60: still waiting after 4 minutes for a closed port), and 30 s for
    a Ray client server, so a typo in ``--address`` would hang the command. ``auto``, other
    schemes and addresses Ray cannot parse are left to Ray, which fails fast on them."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or "://" in host or not colon or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def _private_token() -> None:
    """Make Ray's token file private to this user before a local instance starts.

    Ray 2.60 turns token authentication on for every new local instance and, when the user has
    no token, writes one to ``~/.ray/auth_token`` with plain ``open()``: 0644 under the usual
    umask, so any local user could read it and, through the instance's loopback ports, run code
    as this user. The file is created 0600 here first (Ray then uses it as it is), or tightened
    to 0600 if it exists. Left alone: a token given by ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``
    (the user's own file), and token authentication turned off (``RAY_AUTH_MODE``).
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or \
            {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
            path.chmod(0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray itself writes: 256 random bits


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Drop the warnings of logger ``name`` (one of Ray's) for the duration; errors still pass."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Start Ray's processes with a loopback node address (see ``_LOOPBACK_ENV``)."""
    from ray._private import ray_constants

    saved_env, saved_constant = os.environ.get(_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = saved_env
