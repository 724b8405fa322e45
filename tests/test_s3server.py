"""The moto S3 fixture is a real S3 endpoint for pyarrow, pandas and Ray storage."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import ray
from ray import tune

from s3server import S3Server

# Ray workers cannot import test modules (tests/ is not on their path): ship this module's functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_parquet_written_through_uri_is_an_object_in_the_bucket(s3_server: S3Server, s3_uri: str) -> None:
    fs, root = pyarrow.fs.FileSystem.from_uri(s3_uri)
    table = pa.table({"model_id": ["a", "b", "c"], "clean_accuracy": [0.1, 0.5, 0.9]})
    pq.write_table(table, f"{root}/models/part-0.parquet", filesystem=fs)

    prefix = root.split("/", 1)[1]
    assert s3_server.keys(prefix) == [f"{prefix}/models/part-0.parquet"]
    assert pq.read_table(f"{root}/models/part-0.parquet", filesystem=fs).equals(table)


def test_directory_of_parquet_files_reads_as_one_frame_with_plain_pandas(s3_server: S3Server, s3_uri: str) -> None:
    """The laptop recipe of docs/cluster.md: `pd.read_parquet(STORE + "/matrix")`, no s3fs needed."""
    fs, root = pyarrow.fs.FileSystem.from_uri(s3_uri)
    for part in range(2):
        frame = pd.DataFrame({"source_id": [f"s{part}"], "defense_rate": [part / 2]})
        pq.write_table(pa.Table.from_pandas(frame), f"{root}/matrix/part-{part}.parquet", filesystem=fs)

    prefix = root.split("/", 1)[1]
    read = pd.read_parquet(s3_server.uri(f"{prefix}/matrix")).sort_values("source_id")
    assert read["source_id"].tolist() == ["s0", "s1"]
    assert read["defense_rate"].tolist() == [0.0, 0.5]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _checkpointing_trial(config: dict) -> None:
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "state.json"), "w") as handle:
            json.dump({"x": config["x"]}, handle)
        tune.report({"x": config["x"]}, checkpoint=tune.Checkpoint.from_directory(directory))


def _run_config(server: S3Server, prefix: str, how: str) -> tune.RunConfig:
    """The two ways Ray 2.60 takes a custom endpoint: in the URI's query, or as a pyarrow filesystem."""
    if how == "uri":
        return tune.RunConfig(name="exp", storage_path=server.uri(prefix), verbose=0)
    return tune.RunConfig(
        name="exp", storage_path=f"{server.bucket}/{prefix}", storage_filesystem=server.filesystem(), verbose=0
    )


@pytest.mark.ray
@pytest.mark.parametrize("how", ["uri", "filesystem"])
def test_tune_checkpoint_lands_in_the_bucket(s3_server: S3Server, local_ray: None, how: str) -> None:
    prefix = f"tune-{how}"
    results = tune.Tuner(
        _checkpointing_trial, param_space={"x": 7}, run_config=_run_config(s3_server, prefix, how)
    ).fit()

    assert not results.errors
    checkpoint = results[0].checkpoint
    assert checkpoint.filesystem.type_name == "s3"
    assert checkpoint.path.startswith(f"{s3_server.bucket}/{prefix}/exp/")
    relative = checkpoint.path[len(s3_server.bucket) + 1 :]
    assert f"{relative}/state.json" in s3_server.keys(prefix)
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "state.json")) as handle:
            assert json.load(handle) == {"x": 7}
