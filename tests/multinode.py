"""A multi-node Ray cluster on one machine (a head and two worker raylets) with its S3 storage."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import ray
from ray.cluster_utils import Cluster

from s3server import S3Server

WORKERS = 2


@dataclass
class MultiNodeCluster:
    """A running local cluster (head with no CPUs, so every trial runs on a worker) and its S3 storage."""

    cluster: Cluster
    s3: S3Server

    def storage_uri(self, prefix: str) -> str:
        return self.s3.uri(prefix)

    def worker_ids(self) -> set[str]:
        return {node.node_id for node in self.cluster.worker_nodes}


@contextlib.contextmanager
def start_cluster(s3: S3Server) -> Iterator[MultiNodeCluster]:
    """Head (0 CPUs) + ``WORKERS`` 1-CPU worker raylets, joined by this driver; shut down after."""
    # A driver still connected to another test's local instance could not join this cluster.
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(WORKERS):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield MultiNodeCluster(cluster=cluster, s3=s3)
    finally:
        ray.shutdown()
        cluster.shutdown()
