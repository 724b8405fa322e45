"""Leases (rm_sweep.leases) on a local directory and on S3 (moto): one run holds a model at a time,
a stale lease is taken over, a lease is only ever released or renewed by its own run."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from rm_sweep.leases import LEASE_DIR, Lease, Leases, Owner, this_host
from rm_sweep.storage import Storage


def owner(name: str) -> Owner:
    return Owner(name.ljust(32, "0"), "elsewhere/00000000", 4242)


def plant(files: Storage, model_id: str, *, expires_in: float, renewer: tuple[str, int, float] | None = None,
          run: str = "other") -> Lease:
    lease = Lease(model_id, owner(run), renewer or ("elsewhere/00000000", 4242, 0.0), time.time() + expires_in)
    files.write(files.path(LEASE_DIR, f"{model_id}.json"), lease.to_json())
    return lease


def test_racing_runs_end_with_one_holder(store_uri: str) -> None:
    """Eight runs claim one model at once: exactly one holds it and the others see its lease
    (locally by link(); on S3 by writing, waiting and reading back)."""
    files = Storage(store_uri)
    runs = [Leases(files, owner(f"run{i}")) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda leases: leases.acquire("m"), runs))
    holders = [r for r, result in zip(runs, results) if result is None]
    assert len(holders) == 1
    assert all(result.owner == holders[0].owner for result in results if result is not None)
    assert Leases(files, owner("reader")).read("m").owner == holders[0].owner


def test_a_live_lease_is_kept_and_a_stale_one_taken_over(store_uri: str) -> None:
    files = Storage(store_uri)
    mine = Leases(files, owner("mine"))
    live = plant(files, "live", expires_in=600)
    plant(files, "expired", expires_in=-1)
    assert mine.acquire("live") == live and mine.held_elsewhere("live") == live
    assert mine.acquire("expired") is None and mine.read("expired").owner == mine.owner
    assert not mine.renew("live") and mine.renew("expired")
    mine.release("live")  # not ours: stays
    mine.release("expired")
    assert mine.read("live") == live and mine.read("expired") is None


def test_a_lease_whose_renewing_process_is_gone_from_this_machine_is_stale(tmp_path) -> None:
    files = Storage(str(tmp_path))
    me = psutil.Process()
    plant(files, "dead", expires_in=600, renewer=(this_host(), 2**22 + 1, 0.0))  # no such process
    plant(files, "reused", expires_in=600, renewer=(this_host(), me.pid, me.create_time() - 100))  # pid reused
    alive = plant(files, "alive", expires_in=600, renewer=(this_host(), me.pid, me.create_time()))
    mine = Leases(files, owner("mine"))
    assert mine.acquire("dead") is None and mine.acquire("reused") is None
    assert mine.acquire("alive") == alive  # its renewer (this very process) runs


@pytest.mark.parametrize("expires", ["not json", "1e300", "Infinity", "NaN"])
def test_a_damaged_lease_file_holds_nothing(tmp_path, expires: str) -> None:
    """Not JSON, or an expiry no clock can show (it would never expire, and describing it fails)."""
    files = Storage(str(tmp_path))
    lease = plant(files, "m", expires_in=60).to_json().decode()
    damaged = "\x80\x04not json" if expires == "not json" else re.sub(r'"expires": [^,]+,', f'"expires": {expires},', lease)
    assert damaged != lease
    files.write(files.path(LEASE_DIR, "m.json"), damaged.encode())
    mine = Leases(files, owner("mine"))
    assert mine.read("m") is None and mine.acquire("m") is None and mine.read("m").owner == mine.owner


def test_a_lease_released_while_it_is_read_holds_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = Storage(str(tmp_path))
    plant(files, "m", expires_in=60)
    seen = files.info

    def seen_then_released(path: str):
        found = seen(path)
        files.delete(path)  # its run releases it between the check and the read
        return found

    monkeypatch.setattr(files, "info", seen_then_released)
    assert Leases(files, owner("mine")).read("m") is None


def test_remove_stale_leaves_a_renewed_lease(tmp_path) -> None:
    files = Storage(str(tmp_path))
    stale = plant(files, "m", expires_in=-1)
    mine = Leases(files, owner("mine"))
    renewed = plant(files, "m", expires_in=600)  # the other run renewed it meanwhile
    mine.remove_stale(stale)
    assert mine.read("m") == renewed
    mine.remove_stale(plant(files, "m", expires_in=-1))
    assert mine.read("m") is None and mine.all() == []


def test_a_kept_lease_is_released_at_the_end(tmp_path) -> None:
    files = Storage(str(tmp_path))
    mine = Leases(files, owner("mine"))
    assert mine.acquire("m") is None
    with mine.kept("m"):
        assert mine.read("m").owner == mine.owner
    assert mine.read("m") is None


@pytest.mark.parametrize("expires_in, live", [(600, True), (-1, False)])
def test_leases_are_plain_json(tmp_path, expires_in: float, live: bool) -> None:
    lease = plant(Storage(str(tmp_path)), "m", expires_in=expires_in)
    text = (tmp_path / LEASE_DIR / "m.json").read_text()
    assert text.startswith("{") and '"expires_at"' in text
    assert Lease.from_json(text.encode()) == lease and lease.live() is live
