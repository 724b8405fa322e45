"""Sweeps and matrices over stores that hold traps, damage and other runs' work, on one private
local Ray instance (2 CPUs; tiny ResNet-18s on the toy folder of tests/tinystore.py): nothing read
from a store is unpickled, the instance listens on loopback only, a diverging model is reported
and not stored, a model whose checkpoint is gone is trained again, a live lease is left to its
run and a stale one taken over, leftover training state is resumed or deleted."""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pickle
import stat
import time
from pathlib import Path

import pytest
import torch

from rm_sweep.leases import LEASE_DIR, Lease, Leases, Owner
from rm_sweep.pipeline import complete, train
from rm_sweep.spaces import SearchSpace, load_space
from rm_sweep.store import RUN_DIR, Store

from tinystore import space_file, write_tinted_folder

psutil = pytest.importorskip("psutil")
ray = pytest.importorskip("ray")
# The S3 server's credentials must be in the environment before the module's Ray instance starts.
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("s3_server")]
TWO = [{"name": "a"}, {"name": "b", "shallow_ratio": 0.5}]


class Planted:
    """Unpickling this creates ``path``: the proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tinted_folder(tmp_path_factory.mktemp("tinted"), train=10, test=10)


def tiny(tmp_path: Path, folder: Path, models: list[dict], matrix: list[dict] | None = None, *, epochs: int = 1,
         name: str = "safety") -> SearchSpace:
    return load_space(space_file(tmp_path, folder, models, matrix or [], name=name, epochs=epochs))


def trained_two(tmp_path: Path, folder: Path, data_dir: Path) -> tuple[SearchSpace, Store]:
    """The two models of ``TWO``, trained into ``tmp_path/store``."""
    space, store = tiny(tmp_path, folder, TWO), Store(tmp_path / "store")
    assert train(space, store, data_dir=data_dir, verbose=0).ok
    return space, store


def snapshot(checkpoint_dir: str) -> bytes:
    """Ray Train V2's checkpoint manager snapshot (JSON) naming ``checkpoint_dir`` as the latest."""
    result = {"version": 0, "checkpoint_dir_name": checkpoint_dir, "metrics": {"epoch": 1}}
    return json.dumps({"ray_version": ray.__version__, "checkpoint_results": [result], "checkpoint_report_indices": [0],
                       "latest_checkpoint_result": result, "pending_training_results": [],
                       "pending_validation_specs": [], "current_report_index": 1, "validated_checkpoint_dir_names": [],
                       "timed_out_validation_checkpoint_dir_names": [],
                       "failed_validation_checkpoint_dir_names": []}).encode()


def test_nothing_read_from_a_store_is_unpickled(local_ray, tmp_path: Path, folder: Path, data_dir: Path) -> None:
    """Pickles planted where Tune's state used to live and as a model's Train checkpoint: the
    sweep and the matrix over that store run to the end, and none of them is ever unpickled."""
    matrix = [{"sources": ["a"], "targets": ["b"], "attacks": ["madry_fgsm"], "protocols": ["black"], "limit": 10}]
    space = tiny(tmp_path, folder, TWO, matrix)
    store = Store(tmp_path / "store")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Planted(marker))
    sweep_dir = tmp_path / "store" / RUN_DIR / f"sweep-{space.name}"
    for name in ("tuner.pkl", "experiment_state-2020-01-01_00-00-00.json", "trial-0/error.pkl", "trial-0/params.pkl"):
        (sweep_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (sweep_dir / name).write_bytes(payload)
    victim = space.models()[0].model_id
    run = tmp_path / "store" / RUN_DIR / "train" / victim
    checkpoint = run / "checkpoint_2020-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    torch.save(Planted(marker), checkpoint / "train_state.pt")  # a torch file whose pickle is not weights
    (checkpoint / "extra.pkl").write_bytes(payload)
    (run / "checkpoint_manager_snapshot.json").write_bytes(snapshot(checkpoint.name))

    done = complete(space, store, data_dir=data_dir, verbose=0)
    assert not marker.exists()
    assert done.models_trained == 2 and done.matrix.cells == 1
    assert (sweep_dir / "tuner.pkl").read_bytes() == payload  # never touched
    assert not run.exists()  # the finished model's training state is gone
    again = train(space, store, data_dir=data_dir, verbose=0)
    assert again.trained == [] and not marker.exists()


def test_a_planted_training_state_is_reported_and_training_starts_over(
        local_ray, tmp_path: Path, folder: Path, data_dir: Path) -> None:
    space = tiny(tmp_path, folder, TWO[:1])
    (spec,) = space.models()
    marker = tmp_path / "unpickled"
    run = tmp_path / "store" / RUN_DIR / "train" / spec.model_id
    checkpoint = run / "checkpoint_2020-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    torch.save(Planted(marker), checkpoint / "train_state.pt")
    (run / "checkpoint_manager_snapshot.json").write_bytes(snapshot(checkpoint.name))
    result = train(space, Store(tmp_path / "store"), data_dir=data_dir, verbose=0)
    assert result.ok and result.trained == [spec.model_id] and not marker.exists()
    assert "an earlier training state was unusable" in result.restarted[spec.model_id]
    assert "is corrupt (UnpicklingError)" in result.restarted[spec.model_id]
    assert result.epochs_reported[spec.model_id] == [1]


@pytest.mark.parametrize("planted, reason", [(True, "its checkpoint snapshot is not valid JSON"),
                                              (False, "it has no checkpoint snapshot")])
def test_a_snapshot_that_is_not_json_or_absent_is_deleted_and_the_model_trained(
        local_ray, tmp_path: Path, folder: Path, data_dir: Path, planted: bool, reason: str) -> None:
    space = tiny(tmp_path, folder, TWO[:1])
    (spec,) = space.models()
    run = tmp_path / "store" / RUN_DIR / "train" / spec.model_id
    run.mkdir(parents=True)  # a run killed before its first checkpoint has no snapshot
    if planted:
        (run / "checkpoint_manager_snapshot.json").write_bytes(pickle.dumps(Planted(tmp_path / "unpickled")))
    result = train(space, Store(tmp_path / "store"), data_dir=data_dir, verbose=0)
    assert result.ok and result.trained == [spec.model_id] and not (tmp_path / "unpickled").exists()
    assert result.restarted[spec.model_id] == f"an earlier training state was deleted ({reason})"


def _session_processes() -> list:
    """This Ray session's processes: those naming its session directory on their command line
    (GCS, raylet, dashboard, agents, log monitor), their children (workers), and this driver."""
    session = ray._private.worker._global_node.get_session_dir_path()
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        if session in " ".join(proc.info["cmdline"] or ()):
            for p in [proc, *proc.children(recursive=True)]:
                found[p.pid] = p
    found[os.getpid()] = psutil.Process()
    return list(found.values())


def _loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (::ffff:127.0.0.1, gRPC's way)."""
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _bound(process) -> list[tuple[int, str, str, int]]:
    """(pid, name, address, port) of each socket ``process`` listens on (TCP) or is bound to (UDP);
    none if it has exited meanwhile."""
    try:
        return [(process.pid, process.name(), c.laddr.ip, c.laddr.port) for c in process.net_connections("inet")
                if c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and c.laddr)]
    except psutil.NoSuchProcess:
        return []


def test_a_local_instance_listens_on_loopback_only(local_ray) -> None:
    @ray.remote
    def square(x: int) -> int:
        return x * x

    assert ray.get(square.remote(3)) == 9  # a worker has started and run a task
    processes = _session_processes()
    bound = [address for p in processes for address in _bound(p)]
    assert {"gcs_server", "raylet"} <= {name for _, name, _, _ in bound}
    assert len(bound) >= 5  # GCS, raylet, object manager, dashboard, agents, workers' gRPC servers
    assert all(_loopback(ip) for _, _, ip, _ in bound), bound
    token = Path.home() / ".ray" / "auth_token"
    if "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ and token.exists():
        assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_ray_token_file_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rm_sweep.orchestration.session import _private_token

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"
    _private_token()  # none yet: created private, as Ray would have written it (64 hex digits)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    token.chmod(0o644)  # one Ray wrote before: made private, content kept
    before = token.read_text()
    _private_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == before


def test_a_diverging_model_fails_once_with_its_epoch_and_nothing_is_stored(
        local_ray, tmp_path: Path, folder: Path, data_dir: Path) -> None:
    path = space_file(tmp_path, folder, TWO[:1], [], epochs=2)
    path.write_text(path.read_text().replace("batch_size: 32", "batch_size: 32\n  lr: 1.0e+30"))
    space = load_space(path)
    (spec,) = space.models()
    store = Store(tmp_path / "store")
    result = train(space, store, data_dir=data_dir, verbose=0)
    assert not result.ok and list(result.failed) == [spec.model_id] and result.trained == []
    message = result.failed[spec.model_id]
    # 40 images in batches of 32: one step per epoch, whose loss is taken before the step blows
    # the weights up, so the first non-finite loss is epoch 2's (after the schedule's /10).
    assert message.startswith("training diverged in epoch 2 of 2: the loss is nan (learning rate 1e+29)")
    assert "\n" not in message
    assert store.models().empty and not (tmp_path / "store" / "checkpoints").exists()
    assert not (tmp_path / "store" / LEASE_DIR).exists() or not os.listdir(tmp_path / "store" / LEASE_DIR)


def test_a_model_whose_checkpoint_was_deleted_is_trained_again(
        local_ray, tmp_path: Path, folder: Path, data_dir: Path) -> None:
    space, store = trained_two(tmp_path, folder, data_dir)
    victim = space.models()[1].model_id
    (tmp_path / "store" / "checkpoints" / f"{victim}.pt").unlink()
    again = train(space, Store(store.uri), data_dir=data_dir, verbose=0)
    assert again.ok and again.trained == [victim] and again.damaged == {victim: "its checkpoint is missing"}
    assert Store(store.uri).has_model(victim) and len(Store(store.uri).models()) == 2


def plant_lease(store: Store, model_id: str, *, expires_in: float, host: str = "elsewhere/00000000") -> Lease:
    lease = Lease(model_id, Owner("f" * 32, host, 4242), (host, 4242, 0.0), time.time() + expires_in)
    store.files.write(store.path(LEASE_DIR, f"{model_id}.json"), lease.to_json())
    return lease


def test_a_live_lease_is_left_to_its_run_and_a_stale_one_taken_over(
        local_ray, store_uri: str, tmp_path: Path, folder: Path, data_dir: Path) -> None:
    """Local and S3 stores: the model another live run holds is skipped and reported; the model
    whose lease expired is trained, and so is the unleased one."""
    space = tiny(tmp_path, folder, [{"name": "m", "seed": [0, 1, 2]}])
    held, stale, free = (s.model_id for s in space.models())
    store = Store(store_uri)
    live = plant_lease(store, held, expires_in=600)
    plant_lease(store, stale, expires_in=-1)
    result = train(space, store, data_dir=data_dir, verbose=0)
    assert sorted(result.trained) == sorted([stale, free]) and not result.failed and not result.unfinished
    assert list(result.leased) == [held] and not result.ok
    assert result.leased[held].startswith("leased by another run (run ffffffff on elsewhere, pid 4242; lease renewed")
    leases = Leases(store.files, Owner.new())
    assert leases.read(held) == live  # untouched
    assert leases.read(stale) is None and leases.read(free) is None  # released by the run that took them
    assert store.missing(space.models()) == [space.models()[0]]


def _resumable(run: Path) -> bool:
    """Whether Ray Train's snapshot of ``run`` parses and names a checkpoint holding a training
    state. (Ray writes the snapshot in place: a run killed while writing it leaves one that does
    not parse, which the next run deletes with the run: test_a_snapshot_that_is_not_json_...)"""
    try:
        latest = json.loads((run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return latest is not None and (run / latest["checkpoint_dir_name"] / "train_state.pt").is_file()


def test_a_killed_drivers_training_state_is_resumed_by_the_next_run(
        local_ray, tmp_path: Path, folder: Path, data_dir: Path) -> None:
    """A sweep whose driver is killed (its local Ray instance dies with it) leaves a lease and a
    Train checkpoint. The lease's renewing process ran on this machine and is gone, so the next
    run takes the model over at once and resumes from the checkpoint instead of epoch 1."""
    from scaffold import start_command

    epochs = 4
    path = space_file(tmp_path, folder, TWO[:1], [], epochs=epochs)
    (spec,) = load_space(path).models()
    run = tmp_path / "store" / RUN_DIR / "train" / spec.model_id
    driver = start_command("rm_sweep.sweep", str(path), "--store", str(tmp_path / "store"), "--num-cpus", "1",
                           "--data-dir", str(data_dir), "--quiet")
    family: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 300
    try:
        while not _resumable(run):
            assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0][-3000:]
            family.update({p.pid: p for p in psutil.Process(driver.pid).children(recursive=True)})
            time.sleep(0.2)
        driver.kill()
        driver.wait()
    finally:
        for proc in family.values():  # what the killed driver left running (Ray's agents outlive it)
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(list(family.values()), timeout=30)
    store = Store(tmp_path / "store")
    (lease,) = Leases(store.files, Owner.new()).all()
    assert not lease.live()  # its renewing process is gone
    result = train(load_space(path), store, data_dir=data_dir, verbose=0)
    assert result.ok and result.trained == [spec.model_id] and not result.restarted
    assert result.epochs_reported[spec.model_id][0] > 1 and result.epochs_reported[spec.model_id][-1] == epochs
    assert not run.exists() and not Leases(store.files, Owner.new()).all()


def test_leftover_training_state_of_a_stored_model_is_deleted(
        local_ray, tmp_path: Path, folder: Path, data_dir: Path) -> None:
    space, store = trained_two(tmp_path, folder, data_dir)
    stored = space.models()[0].model_id
    leftover = tmp_path / "store" / RUN_DIR / "train" / stored / "checkpoint_2020-01-01_00-00-00.000000"
    leftover.mkdir(parents=True)
    (leftover / "train_state.pt").write_bytes(b"left by an orphaned worker")
    (tmp_path / "store" / "checkpoints" / f"{space.models()[1].model_id}.pt").unlink()  # so there is work to do
    result = train(space, store, data_dir=data_dir, verbose=0)
    assert result.removed_states == [stored] and not leftover.parent.exists()
