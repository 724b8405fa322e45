"""The project's own sweep and matrix on a multi-node cluster, store and Ray storage on S3.

A head and two 1-CPU worker raylets on this machine (the `multinode` fixture) and a moto S3 server: real tiny ResNet-18s on 200 CIFAR-10 images train as
Tune trials spread over both workers, the matrix runs on the same cluster, and every checkpoint
and Parquet file lands in the bucket. A worker node removed mid-trial (a reclaimed spot
instance) costs the trial only the epoch in progress: it resumes on another node from its last
checkpoint, and the store ends with one row per model.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray")
import ray._private.state

from rm_sweep.orchestration.values import MatrixOptions
from rm_sweep.pipeline import complete, train
from rm_sweep.spaces import SearchSpace, load_space
from rm_sweep.spec import MATRIX_KEY
from rm_sweep.store import RUN_DIR, Store

from multinode import MultiNodeCluster
from s3server import S3Server
from scaffold import tiny_space as space_of, write_space

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(240)]

TRAIN_WORKER = "RayTrainWorker"  # Ray Train V2's worker actor: where a trial's training runs
POLL_S = 0.2


def tiny_space(tmp_path: Path, cifar_folder: Path, name: str, models: list[dict], matrix: list[dict],
               epochs: int) -> SearchSpace:
    """Width-0.125 ResNet-18s on 200 training / 100 test CIFAR-10 images, one CPU per trial."""
    space = space_of(name, cifar_folder, models, matrix, epochs=epochs, train_subset=200, test_subset=100)
    return load_space(write_space(tmp_path / f"{name}.yaml", space))


def store_keys(s3: S3Server, store: Store) -> list[str]:
    """Object keys under the store's prefix, relative to it."""
    prefix = store.path()[len(s3.bucket) + 1:]
    return [key[len(prefix) + 1:] for key in s3.keys(prefix)]


def train_workers() -> dict[str, tuple[str, str]]:
    """Actor id -> (node id, state) of every Train worker actor this cluster has had, dead ones included.

    The GCS actor table: the public state API (`ray.util.state`) needs the dashboard, which the
    fixture leaves off to spare this machine's CPUs."""
    return {actor_id: (a["Address"]["NodeID"], a["State"]) for actor_id, a in ray._private.state.actors().items()
            if a["ActorClassName"].endswith(TRAIN_WORKER)}


def test_sweep_and_matrix_spread_over_nodes_and_land_in_the_bucket(
        multinode: MultiNodeCluster, s3_uri: str, cifar_folder: Path, data_dir: Path, tmp_path: Path) -> None:
    space = tiny_space(tmp_path, cifar_folder, "spread", [
        {"name": "source"},
        {"name": "targets", "shallow_ratio": 0.5, "seed": [1, 2]},
    ], [{"sources": ["source"], "targets": ["targets"], "attacks": ["madry_fgsm"], "protocols": ["black"]}],
        epochs=1)
    store = Store(s3_uri)
    ids = sorted(s.model_id for s in space.models())

    swept = train(space, store, address=multinode.cluster.address, data_dir=data_dir, verbose=0)
    done = complete(space, store, address=multinode.cluster.address, data_dir=data_dir,
                    options=MatrixOptions(batch_size=100), verbose=0)

    assert swept.ok and sorted(swept.trained) == ids and len(ids) == 3
    assert done.models_trained == 0 and done.matrix is not None and done.matrix.cells == len(space.cells) == 2
    assert sorted(store.models().model_id) == ids  # one row per model
    keys = [tuple(row[c] for c in MATRIX_KEY) for row in store.matrix().to_dict("records")]
    assert len(keys) == len(set(keys)) == len(space.cells)  # every cell once
    assert set(keys) == {c.key() for c in space.cells}
    # Trials ran on both workers, never on the head (it has no CPUs).
    nodes = {node for node, _ in train_workers().values()}
    assert len(nodes) == 2 and nodes <= multinode.worker_ids()
    # Everything a laptop would read is in the bucket, nothing on a node's disk.
    in_bucket = store_keys(multinode.s3, store)
    assert sorted(k for k in in_bucket if k.startswith("checkpoints/")) == [f"checkpoints/{i}.pt" for i in ids]
    assert [k for k in in_bucket if k.startswith("models/") and k.endswith(".parquet")]
    assert [k for k in in_bucket if k.startswith("matrix/") and k.endswith(".parquet")]
    # Tune's own state (pickles) stays with the driver; finished Train runs leave nothing behind.
    assert not [k for k in in_bucket if k.startswith(f"{RUN_DIR}/")]


class NodeReclaimer:
    """Once the Train run of `model_id` has registered its first checkpoint in the bucket, removes
    the node its worker runs on and adds a fresh one (a spot node reclaimed and replaced).

    Runs in the main thread while the sweep runs in another: Ray starts a node's processes only
    from the main thread (it installs signal handlers)."""

    def __init__(self, env: MultiNodeCluster, store: Store, model_id: str) -> None:
        self.env, self.store, self.model_id = env, store, model_id
        self.snapshot = f"{RUN_DIR}/train/{model_id}/checkpoint_manager_snapshot.json"
        self.removed: str | None = None
        self.model_stored_at_removal: bool | None = None

    def watch(self, sweep: Future) -> None:
        while not sweep.done():
            if self.snapshot in store_keys(self.env.s3, self.store):
                alive = {node for node, state in train_workers().values() if state == "ALIVE"}
                victims = [n for n in self.env.cluster.worker_nodes if n.node_id in alive]
                if victims:
                    self.model_stored_at_removal = self.store.has_model(self.model_id)
                    self.env.cluster.remove_node(victims[0], allow_graceful=False)
                    self.removed = victims[0].node_id
                    self.env.cluster.add_node(num_cpus=1)
                    return
            time.sleep(POLL_S)


def test_a_trial_whose_node_is_removed_resumes_elsewhere_from_its_checkpoint(
        multinode: MultiNodeCluster, s3_uri: str, cifar_folder: Path, data_dir: Path, tmp_path: Path) -> None:
    space = tiny_space(tmp_path, cifar_folder, "reclaimed", [{"name": "m", "shallow_ratio": 0.5}], [], epochs=3)
    (spec,) = space.models()
    store = Store(s3_uri)
    earlier = set(train_workers())
    reclaimer = NodeReclaimer(multinode, store, spec.model_id)
    with ThreadPoolExecutor(max_workers=1) as pool:
        sweep = pool.submit(train, space, store, address=multinode.cluster.address, data_dir=data_dir, verbose=0)
        reclaimer.watch(sweep)
        result = sweep.result()

    assert reclaimer.removed is not None and reclaimer.model_stored_at_removal is False
    assert result.ok and result.trained == [spec.model_id]
    # Each epoch reported once: the restarted worker went on from epoch 1's checkpoint.
    assert result.epochs_reported[spec.model_id] == [1, 2, 3]
    assert store.models().model_id.tolist() == [spec.model_id]  # one row, written once
    # One worker on the removed node, and the one that finished on a node still in the cluster.
    nodes = [node for actor_id, (node, _) in train_workers().items() if actor_id not in earlier]
    assert reclaimer.removed in nodes
    assert {n for n in nodes if n != reclaimer.removed} & multinode.worker_ids()
    assert [k for k in store_keys(multinode.s3, store) if k.startswith("checkpoints/")] == [
        f"checkpoints/{spec.model_id}.pt"]
