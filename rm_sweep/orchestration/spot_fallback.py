"""Spot first, on-demand when spot cannot launch: a utilization scorer for Ray's autoscaler.

`clusters/aws.yaml` starts the head with
`RAY_AUTOSCALER_UTILIZATION_SCORER=rm_sweep.orchestration.spot_fallback.spot_first_scorer`.
Ray's default scorer ranks node types only by how well their resources fit the pending demand, so
a spot type and its on-demand twin tie, and a spot type AWS keeps refusing keeps being chosen.
This scorer ranks, in order: can the type launch (no failed launch in the autoscaler's record,
which forgets failures after AUTOSCALER_NODE_AVAILABILITY_MAX_STALENESS_S, 30 min), Ray's own
fit score, then spot over on-demand (types named "*-spot").
"""
from __future__ import annotations

from typing import Any

from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer

SPOT_SUFFIX = "-spot"


def spot_first_scorer(
    node_resources: dict[str, float],
    resources: list[dict[str, float]],
    node_type: str,
    *,
    node_availability_summary: NodeAvailabilitySummary,
) -> tuple[Any, ...] | None:
    """Ray's score for `node_type` with launchability in front and spot preference behind.

    Returns None where the type cannot hold any of the demanded bundles (Ray's convention);
    otherwise a tuple compared lexicographically, higher is better.
    """
    fit = _default_utilization_scorer(
        node_resources, resources, node_type, node_availability_summary=node_availability_summary
    )
    if fit is None:
        return None
    record = node_availability_summary.node_availabilities.get(node_type)
    can_launch = record is None or record.is_available
    return (can_launch, *fit, node_type.endswith(SPOT_SUFFIX))
