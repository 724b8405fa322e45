"""Leases: which run trains which model, so that two sweeps on one store never train a model twice.

A run (one sweep, or the sweep inside a matrix) claims a model before training it by writing
``STORE/_leases/<model_id>.json``: the run's id, the host and pid of its driver, the process that
last renewed the lease and when the lease expires. The trial holding it renews it every
``RENEW_SECONDS`` and the training worker after every epoch; finishing (or failing) releases it.
Another run skips a model whose lease is live and trains the rest; a lease is stale, and taken
over, once it has expired, or at once when the process that last renewed it ran on this machine
(same host name and boot) and is gone: a driver killed on a laptop, with its local Ray instance,
frees its models for the next run immediately.

Claiming is atomic on a local (or NFS) store: the lease file is created with ``link``, which fails
if it exists. S3 has no create-if-absent, so there a run writes its lease, waits ``SETTLE_SECONDS``
and reads it back: if another run wrote in between, the last write wins and the loser backs off.
Two runs both train a model only if one's write reaches S3 more than ``SETTLE_SECONDS`` after the
other's read-back (docs/security.md). Lease files are JSON, never executed or unpickled.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import pyarrow.fs as pafs

from rm_sweep.atomic import file_mode
from rm_sweep.storage import Storage

LEASE_DIR = "_leases"  # "_" hides it from Parquet readers
LEASE_SECONDS = 600.0  # a lease nobody renews is stale after this long
RENEW_SECONDS = 60.0  # how often a trial renews its lease
SETTLE_SECONDS = 1.0  # S3: how long a claim waits before reading its lease back


def this_host() -> str:
    """This machine: its host name and boot (two boots of one machine are two hosts)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "-"
    return f"{socket.gethostname()}/{boot}"


@dataclass(frozen=True)
class Owner:
    """A run that holds leases: its id and its driver's host and pid."""

    run: str
    host: str
    pid: int

    @classmethod
    def new(cls) -> Owner:
        return cls(uuid.uuid4().hex, this_host(), os.getpid())


@dataclass(frozen=True)
class Lease:
    """A lease as stored: the model, its owner, the process that renewed it last (host, pid and
    start time) and the expiry (UNIX time)."""

    model_id: str
    owner: Owner
    renewer: tuple[str, int, float]
    expires: float

    def live(self) -> bool:
        """Not expired, and its renewing process alive as far as this machine can tell."""
        if self.expires <= time.time():
            return False
        host, pid, started = self.renewer
        return host != this_host() or _running(pid, started)

    def describe(self) -> str:
        until = dt.datetime.fromtimestamp(self.expires, dt.timezone.utc).strftime("%H:%M:%S UTC")
        return f"leased by another run (run {self.owner.run[:8]} on {self.owner.host.split('/')[0]}, " \
               f"pid {self.owner.pid}; lease renewed until {until})"

    def to_json(self) -> bytes:
        expires_at = dt.datetime.fromtimestamp(self.expires, dt.timezone.utc).isoformat()
        return json.dumps({"model_id": self.model_id, "owner": asdict(self.owner), "renewer": list(self.renewer),
                           "expires": self.expires, "expires_at": expires_at}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Lease | None:
        """The lease in ``data``; None if it is not one (a damaged lease file holds nothing)."""
        try:
            d = json.loads(data)
            host, pid, started = d["renewer"]
            lease = cls(str(d["model_id"]), Owner(**d["owner"]), (str(host), int(pid), float(started)),
                        float(d["expires"]))
            dt.datetime.fromtimestamp(lease.expires, dt.timezone.utc)  # a time a clock can show (not NaN, inf, 1e300)
            return lease
        except (ValueError, TypeError, KeyError, OverflowError, OSError):
            return None


def _running(pid: int, started: float) -> bool:
    """Whether process ``pid``, started at ``started``, still runs (not another one given the same
    pid since, not a zombie waiting to be reaped)."""
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Leases:
    """The leases of a store, as seen by ``owner``."""

    def __init__(self, files: Storage, owner: Owner, seconds: float = LEASE_SECONDS) -> None:
        self.files, self.owner, self.seconds = files, owner, seconds

    def _path(self, model_id: str) -> str:
        return self.files.path(LEASE_DIR, f"{model_id}.json")

    def read(self, model_id: str) -> Lease | None:
        """The model's lease, or None (no lease file, or a damaged one)."""
        path = self._path(model_id)
        if self.files.info(path).type != pafs.FileType.File:
            return None
        data = self.files.read(path, f"lease {self.files.display(path)}", missing_ok=True)  # None: released meanwhile
        return None if data is None else Lease.from_json(data)

    def held_elsewhere(self, model_id: str) -> Lease | None:
        """The model's lease if another run holds it live, else None."""
        lease = self.read(model_id)
        return lease if lease is not None and lease.owner.run != self.owner.run and lease.live() else None

    def acquire(self, model_id: str) -> Lease | None:
        """Claim the model for this run; returns None if this run holds it now, else the live
        lease of the run that does."""
        for _ in range(3):  # a claim lost to a lease that is then released or damaged is tried again
            current = self.read(model_id)
            if current is not None and current.owner.run != self.owner.run and current.live():
                return current
            if not self.files.local:
                self.files.write(self._path(model_id), self._fresh(model_id).to_json())
                time.sleep(SETTLE_SECONDS)
            elif current is not None and current.owner.run == self.owner.run:
                self.files.write(self._path(model_id), self._fresh(model_id).to_json())  # ours already: renew
            elif self._create(model_id, current):
                return None
            holder = self.read(model_id)
            if holder is not None and holder.owner.run == self.owner.run:
                return None
            if holder is not None and holder.live():
                return holder
        return self.read(model_id)

    def _create(self, model_id: str, current: Lease | None) -> bool:
        """Create the model's lease file if none exists (``link`` is atomic: it fails if another
        run created one first); a stale or damaged lease is removed first, unless it was replaced
        meanwhile."""
        path = self._path(model_id)
        if Path(path).exists() and self.read(model_id) == current:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with self.files.errors(f"write {path}"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".lease.")
            try:
                os.write(fd, self._fresh(model_id).to_json())
                os.fchmod(fd, file_mode())
                os.close(fd)
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)

    def renew(self, model_id: str) -> bool:
        """Extend this run's lease; False if another run holds it now (this one had expired)."""
        current = self.read(model_id)
        if current is not None and current.owner.run != self.owner.run:
            return False
        self.files.write(self._path(model_id), self._fresh(model_id).to_json())
        return True

    @contextlib.contextmanager
    def kept(self, model_id: str) -> Iterator[None]:
        """Renew the lease every ``RENEW_SECONDS`` while the block runs, then release it."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(RENEW_SECONDS):
                with contextlib.suppress(Exception):  # a failed renewal is retried next round
                    self.renew(model_id)

        thread = threading.Thread(target=renew, name=f"lease-{model_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release(model_id)

    def release(self, model_id: str) -> None:
        """Delete the model's lease if this run holds it."""
        current = self.read(model_id)
        if current is not None and current.owner.run == self.owner.run:
            self.files.delete(self._path(model_id))

    def remove_stale(self, lease: Lease) -> None:
        """Delete ``lease``, a stale one, unless it was renewed or replaced meanwhile."""
        if not lease.live() and self.read(lease.model_id) == lease:
            self.files.delete(self._path(lease.model_id))

    def all(self) -> list[Lease]:
        """Every readable lease of the store."""
        leases = [self.read(Path(i.path).stem) for i in self.files.listing(self.files.path(LEASE_DIR))
                  if i.base_name.endswith(".json") and not i.base_name.startswith(".")]
        return [lease for lease in leases if lease is not None]

    def _fresh(self, model_id: str) -> Lease:
        me = psutil.Process()
        return Lease(model_id, self.owner, (this_host(), me.pid, me.create_time()), time.time() + self.seconds)


__all__ = ["LEASE_DIR", "LEASE_SECONDS", "Lease", "Leases", "Owner", "RENEW_SECONDS", "SETTLE_SECONDS", "this_host"]
