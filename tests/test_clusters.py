"""The cluster files pass Ray's own validation offline and say what docs/cluster.md says.

Validation is what `ray up` does before it talks to any cloud: the schema check, then
`validate_config(prepare_config(cfg))`. The schema runs first on the raw file so that a broken
file fails with the schema's message instead of a KeyError deep inside `prepare_config`.
"""
from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
CLUSTER_FILES = ["aws.yaml", "local.yaml"]
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())

# node type -> (instance type, GPUs, spot?); docs/cluster.md's table says the same.
AWS_NODE_TYPES = {
    "head": ("m5.xlarge", 0, False),
    "gpu1-spot": ("g5.xlarge", 1, True),
    "gpu1-ondemand": ("g5.xlarge", 1, False),
    "gpu4-spot": ("g5.12xlarge", 4, True),
    "gpu4-ondemand": ("g5.12xlarge", 4, False),
}


def validate_cluster_config(raw: dict) -> dict:
    """Validate a cluster config as `ray up` does (offline part); return the prepared config.

    Raises:
        jsonschema.ValidationError: the raw file breaks Ray's cluster schema.
        ValueError: the prepared config is inconsistent (e.g. head_node_type not a node type).
    """
    jsonschema.validate(raw, SCHEMA)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


@pytest.fixture(scope="module")
def aws() -> dict:
    return validate_cluster_config(load("aws.yaml"))


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_passes_rays_validation(name: str) -> None:
    prepared = validate_cluster_config(load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _without(key: str):
    return lambda cfg: cfg.pop(key)


def _set(path: tuple[str, ...], value):
    def edit(cfg: dict) -> None:
        for key in path[:-1]:
            cfg = cfg[key]
        cfg[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "name, corrupt, error, message",
    [
        ("aws.yaml", _without("provider"), jsonschema.ValidationError, "'provider' is a required property"),
        ("aws.yaml", _set(("idle_timeout_minute",), 10), jsonschema.ValidationError, "'idle_timeout_minute' was unexpected"),
        (
            "aws.yaml",
            _set(("available_node_types", "gpu1-spot", "resources"), {"GPU": -1}),
            jsonschema.ValidationError,
            "-1 is less than the minimum of 0",
        ),
        (
            "aws.yaml",
            _set(("available_node_types", "gpu4-spot", "min_workers"), "zero"),
            jsonschema.ValidationError,
            "'zero' is not of type 'integer'",
        ),
        ("aws.yaml", _set(("head_node_type",), "gpu8"), ValueError, "head_node_type"),
        ("aws.yaml", _set(("available_node_types", "gpu1-spot", "min_workers"), 11), ValueError, "max_workers"),
        ("local.yaml", _set(("provider", "worker_ips"), "192.0.2.11"), jsonschema.ValidationError, "not of type 'array'"),
    ],
)
def test_malformed_cluster_file_fails_validation(name: str, corrupt, error: type[Exception], message: str) -> None:
    raw = load(name)
    corrupt(raw)
    with pytest.raises(error, match=re.escape(message)):
        validate_cluster_config(raw)


def test_aws_node_types_are_the_documented_ones(aws: dict) -> None:
    types = aws["available_node_types"]
    assert set(types) == set(AWS_NODE_TYPES)
    assert aws["head_node_type"] == "head"
    for name, (instance, gpus, spot) in AWS_NODE_TYPES.items():
        node = types[name]
        assert node["node_config"]["InstanceType"] == instance
        assert node["resources"].get("GPU", 0) == gpus
        market = node["node_config"].get("InstanceMarketOptions", {}).get("MarketType")
        assert market == ("spot" if spot else None), name


def test_aws_head_takes_no_trials_and_workers_scale_from_zero(aws: dict) -> None:
    types = aws["available_node_types"]
    assert types["head"]["resources"]["CPU"] == 0
    workers = [node for name, node in types.items() if name != "head"]
    assert all(node["min_workers"] == 0 for node in workers)
    assert all(node["max_workers"] >= 1 for node in workers)
    assert aws["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("shape", ["gpu1", "gpu4"])
def test_aws_spot_type_is_its_on_demand_twin_plus_the_spot_market(aws: dict, shape: str) -> None:
    """Falling back from spot to on-demand lands on the same hardware, profile, image and disk."""
    spot = aws["available_node_types"][f"{shape}-spot"]
    on_demand = aws["available_node_types"][f"{shape}-ondemand"]
    spot_config = dict(spot["node_config"])
    assert spot_config.pop("InstanceMarketOptions")["SpotOptions"]["InstanceInterruptionBehavior"] == "terminate"
    assert spot_config == on_demand["node_config"]
    assert spot["resources"] == on_demand["resources"]


def test_aws_docker_image_is_pinned_to_this_ray_python_and_cuda(aws: dict) -> None:
    image = aws["docker"]["image"]
    repository, tag = image.split(":")
    assert repository == "rayproject/ray"
    assert "latest" not in tag and "nightly" not in tag
    ray_version, python, cuda = tag.split("-")
    assert ray_version == ray.__version__
    assert python == f"py{sys.version_info.major}{sys.version_info.minor}"
    assert cuda == "cu" + torch.version.cuda.replace(".", "")
    assert not {"head_image", "worker_image"} & set(aws["docker"])


def test_aws_nodes_reach_s3_through_instance_profiles(aws: dict) -> None:
    for name, node in aws["available_node_types"].items():
        arn = node["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), name


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_no_credentials_in_cluster_file(name: str) -> None:
    text = (CLUSTERS / name).read_text()
    assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text)
    assert not re.search(r"(?i)aws_(secret_)?access_key|secret_key|session_token|password", text)


def test_aws_security_group_opens_ssh_only(aws: dict) -> None:
    rules = aws["provider"]["security_group"]["IpPermissions"]
    assert rules
    assert all((rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22) for rule in rules)
    # A node type with its own groups would bypass the rules above.
    assert not any("SecurityGroupIds" in node["node_config"] for node in aws["available_node_types"].values())


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_dashboard_listens_on_the_head_loopback_only(name: str) -> None:
    prepared = validate_cluster_config(load(name))
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in start


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_node_installs_this_checkout(name: str) -> None:
    prepared = validate_cluster_config(load(name))
    mounted = {remote: ROOT / local for remote, local in prepared["file_mounts"].items()}
    assert all(path.exists() for path in mounted.values())
    project = next(remote for remote, local in mounted.items() if local == ROOT / "pyproject.toml")
    project_dir = project.rsplit("/", 1)[0]
    assert f"{project_dir}/rm_sweep" in prepared["file_mounts"]
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert any(re.search(rf"pip install .*{re.escape(project_dir)}(\s|$)", command) for command in commands)


def test_local_cluster_keeps_every_listed_machine() -> None:
    raw = load("local.yaml")
    prepared = validate_cluster_config(raw)
    assert raw["provider"]["type"] == "local"
    (node,) = prepared["available_node_types"].values()
    assert node["min_workers"] == node["max_workers"] == len(raw["provider"]["worker_ips"])


def test_docs_describe_every_node_type_and_both_files() -> None:
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for name, (instance, _, _) in AWS_NODE_TYPES.items():
        assert f"`{name}` | {instance} |" in docs
    for name in CLUSTER_FILES:
        assert f"clusters/{name}" in docs
    assert load("aws.yaml")["docker"]["image"] in docs
