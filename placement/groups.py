"""Create the Ray placement groups of a :class:`PlacementPlan` and the scheduling options of an actor."""
from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from placement.plan import Assignment, PlacementPlan, check_fits


def create_groups(plan: PlacementPlan, prefix: str, timeout_s: float = 120.0) -> dict:
    """Create and wait for every group; names are ``<prefix>-<group>`` (shown on the dashboard)."""
    check_fits(plan, ray.cluster_resources())
    groups = {}
    for spec in plan.groups:
        groups[spec.name] = placement_group(spec.bundles, strategy=spec.strategy, name=f"{prefix}-{spec.name}")
    for name, pg in groups.items():
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"placement group '{prefix}-{name}' was not ready after {timeout_s:.0f}s; "
                f"available resources: {ray.available_resources()}"
            ) from None
    return groups


def remove_groups(groups: dict) -> None:
    for pg in groups.values():
        remove_placement_group(pg)


def actor_options(assignment: Assignment, groups: dict, name: str) -> dict:
    """Options for ``ActorClass.options(**...)`` placing the actor on its bundle."""
    return {
        "name": name,
        "num_cpus": assignment.num_cpus,
        "num_gpus": assignment.num_gpus,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=groups[assignment.group],
            placement_group_bundle_index=assignment.bundle_index,
        ),
    }
