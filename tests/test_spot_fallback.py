"""The AWS cluster asks for spot GPUs first and falls back to on-demand when spot launches fail."""
from __future__ import annotations

import functools
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.loader import load_function_or_class
from ray.autoscaler._private.node_provider_availability_tracker import (
    NodeAvailabilityRecord,
    NodeAvailabilitySummary,
    UnavailableNodeInformation,
)
from ray.autoscaler._private.resource_demand_scheduler import get_nodes_for

from rm_sweep.orchestration.spot_fallback import spot_first_scorer

AWS = yaml.safe_load((Path(__file__).parents[1] / "clusters" / "aws.yaml").read_text())
NODE_TYPES = AWS["available_node_types"]


def _summary(*failed: str) -> NodeAvailabilitySummary:
    return NodeAvailabilitySummary(
        {
            node_type: NodeAvailabilityRecord(
                node_type=node_type,
                is_available=False,
                last_checked_timestamp=0.0,
                unavailable_node_information=UnavailableNodeInformation(
                    category="InsufficientInstanceCapacity", description="no spot capacity"
                ),
            )
            for node_type in failed
        }
    )


def _launch_plan(demand: list[dict[str, float]], summary: NodeAvailabilitySummary) -> dict[str, int]:
    """What Ray's own bin-packing (the autoscaler's get_nodes_for) launches with this scorer."""
    plan, unfulfilled = get_nodes_for(
        NODE_TYPES,
        existing_nodes={},
        head_node_type=AWS["head_node_type"],
        max_to_add=AWS["max_workers"],
        resources=demand,
        utilization_scorer=functools.partial(spot_first_scorer, node_availability_summary=summary),
    )
    assert not unfulfilled
    return dict(plan)


# A one-GPU trial, and a four-GPU bundle that only the multi-GPU shape holds.
SHAPES = [("gpu1", [{"GPU": 1, "CPU": 1}]), ("gpu4", [{"GPU": 4, "CPU": 8}])]


@pytest.mark.parametrize("shape, demand", SHAPES)
def test_spot_is_launched_while_it_launches(shape: str, demand: list[dict[str, float]]) -> None:
    assert _launch_plan(demand, _summary()) == {f"{shape}-spot": 1}


@pytest.mark.parametrize("shape, demand", SHAPES)
def test_on_demand_twin_is_launched_after_a_failed_spot_launch(shape: str, demand: list[dict[str, float]]) -> None:
    assert _launch_plan(demand, _summary(f"{shape}-spot")) == {f"{shape}-ondemand": 1}


def test_a_failed_shape_leaves_the_other_shape_on_spot() -> None:
    assert _launch_plan(SHAPES[0][1], _summary("gpu4-spot")) == {"gpu1-spot": 1}


def test_a_type_that_cannot_hold_the_demand_is_not_scored() -> None:
    assert spot_first_scorer({"CPU": 4}, [{"GPU": 1}], "cpu-spot", node_availability_summary=_summary()) is None


def test_head_starts_the_autoscaler_with_this_scorer() -> None:
    start = " ".join(AWS["head_start_ray_commands"])
    setting = next(w for w in shlex.split(start.replace(";", " ")) if w.startswith("RAY_AUTOSCALER_UTILIZATION_SCORER="))
    assert load_function_or_class(setting.split("=", 1)[1]) is spot_first_scorer
