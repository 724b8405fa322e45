"""Multi-node Tune on one machine: a head and two worker raylets, storage on a local S3 server.

What a real cluster needs from the code is shown here without one: trials spread over nodes,
every checkpoint goes to shared S3 storage, and a trial whose node disappears resumes on another
node from its last checkpoint. The trainable under test is a parameter of `run_experiment`, so
the project's sweep function can replace `counting_trial` without touching the cluster fixture;
a trainable needs only report `node_id` (ray.get_runtime_context().get_node_id()) with each result.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import ray
from ray import tune
from ray.cluster_utils import Cluster

from multinode import MultiNodeCluster

# A lost GCS connection makes Ray retry for minutes: fail fast instead (pytest-timeout, in the test extra).
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(240)]

# Ray workers cannot import test modules (tests/ is not on their path): ship this module's functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

def _read_step(checkpoint: tune.Checkpoint) -> int:
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "state.json")) as handle:
            return json.load(handle)["step"]


def counting_trial(config: dict) -> None:
    """Counts to `config["steps"]`, checkpointing every step; restarts continue after the checkpoint.

    Reports `step`, the `node_id` it runs on and `resumed_from` (the first step of this run: 0 on a
    fresh start, > 0 after a restore).
    """
    checkpoint = tune.get_checkpoint()
    start = _read_step(checkpoint) + 1 if checkpoint else 0
    node_id = ray.get_runtime_context().get_node_id()
    for step in range(start, config["steps"]):
        time.sleep(config["step_seconds"])
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, "state.json"), "w") as handle:
                json.dump({"step": step}, handle)
            tune.report(
                {"step": step, "node_id": node_id, "resumed_from": start},
                checkpoint=tune.Checkpoint.from_directory(directory),
            )


@dataclass
class NodeRecorder(tune.Callback):
    """Records which node each trial reported from (driver side)."""

    nodes_by_trial: dict[str, set[str]] = field(default_factory=dict)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.nodes_by_trial.setdefault(trial.trial_id, set()).add(result["node_id"])


@dataclass
class NodeKiller(NodeRecorder):
    """Kills the worker node of the first trial that reaches `after_step`, then adds a fresh node.

    This is a spot instance being reclaimed and the autoscaler replacing it.
    """

    cluster: Cluster | None = None
    after_step: int = 1
    killed_node: str | None = None
    killed_trial: str | None = None

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        super().on_trial_result(iteration, trials, trial, result, **info)
        if self.killed_node is not None or result["step"] < self.after_step:
            return
        node = next(n for n in self.cluster.worker_nodes if n.node_id == result["node_id"])
        self.cluster.remove_node(node, allow_graceful=False)
        self.killed_node, self.killed_trial = result["node_id"], trial.trial_id
        self.cluster.add_node(num_cpus=1)

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into the experiment state (for Tuner.restore); a live cluster
        # handle cannot be pickled and would mean nothing after a restore.
        return {**self.__dict__, "cluster": None}


def run_experiment(
    env: MultiNodeCluster,
    trainable: Callable[[dict], None],
    param_space: dict,
    name: str,
    callbacks: list[tune.Callback],
    max_failures: int = 0,
) -> tune.ResultGrid:
    run_config = tune.RunConfig(
        name=name,
        storage_path=env.storage_uri("ray"),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        callbacks=callbacks,
        verbose=0,
    )
    return tune.Tuner(trainable, param_space=param_space, run_config=run_config).fit()


def _checkpoints_in_bucket(env: MultiNodeCluster, result: tune.Result) -> list[str]:
    """Object keys of the checkpoint files of one trial (its storage directory is `result.path`)."""
    trial_dir = result.path[len(env.s3.bucket) + 1 :]
    return [key for key in env.s3.keys(trial_dir) if key.endswith("/state.json")]


def test_trials_spread_over_worker_nodes_and_checkpoint_to_the_bucket(multinode: MultiNodeCluster) -> None:
    recorder = NodeRecorder()
    steps = 3
    results = run_experiment(
        multinode,
        counting_trial,
        {"steps": steps, "step_seconds": 0.5, "trial": tune.grid_search([0, 1, 2])},
        name="spread",
        callbacks=[recorder],
    )

    assert not results.errors
    nodes = set().union(*recorder.nodes_by_trial.values())
    assert len(nodes) > 1
    assert nodes <= multinode.worker_ids()
    for result in results:
        assert result.metrics["step"] == steps - 1
        assert result.checkpoint.filesystem.type_name == "s3"
        # One checkpoint per reported step, every one of them in the bucket.
        assert len(_checkpoints_in_bucket(multinode, result)) == steps


def test_trial_resumes_from_its_checkpoint_after_its_node_is_lost(multinode: MultiNodeCluster) -> None:
    killer = NodeKiller(cluster=multinode.cluster, after_step=1)
    steps = 6
    results = run_experiment(
        multinode,
        counting_trial,
        {"steps": steps, "step_seconds": 0.5, "trial": tune.grid_search([0, 1])},
        name="node-loss",
        callbacks=[killer],
        max_failures=2,
    )

    assert killer.killed_node is not None
    assert not results.errors
    assert [r.metrics["step"] for r in results] == [steps - 1] * 2
    killed = next(r for r in results if killer.killed_trial in r.path)
    # Restored from a checkpoint written before the node died, not started over ...
    assert killed.metrics["resumed_from"] >= 1
    # ... and finished on a node that is still alive.
    assert killed.metrics["node_id"] != killer.killed_node
    assert killed.metrics["node_id"] in multinode.worker_ids()
    assert len(_checkpoints_in_bucket(multinode, killed)) >= steps - killed.metrics["resumed_from"]
