"""Create the Ray placement groups of a :class:`PlacementPlan` and the scheduling options of an actor.

On an autoscaling cluster (KubeRay) a pending placement group is what makes nodes come, so a plan
larger than today's cluster is a warning, not an error: :func:`create_groups` waits up to
``timeout_s`` (``cluster.pg_timeout_s``), logging every ``STATUS_EVERY_S`` which groups wait and
which resources are missing, and then fails with a :class:`PlacementTimeout` naming them.
"""
from __future__ import annotations

import logging
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from miles_ray.errors import UserError
from placement.plan import Assignment, PlacementPlan, check_fits, shortfall

log = logging.getLogger("miles_ray.placement")
STATUS_EVERY_S = 30.0


class PlacementTimeout(UserError, TimeoutError):
    """Placement groups still pending after ``cluster.pg_timeout_s``."""


def _need(specs: list) -> dict:
    total: dict = {}
    for spec in specs:
        for bundle in spec.bundles:
            for k, v in bundle.items():
                total[k] = total.get(k, 0) + v
    return total


def missing(plan: PlacementPlan, prefix: str, pending: list) -> str:
    """Which groups wait and which resources the cluster lacks for them (free now, and in all)."""
    specs = [g for g in plan.groups if g.name in pending]
    need = _need(specs)
    free = shortfall(need, ray.available_resources()) or "enough free now: being placed"
    total = shortfall(need, ray.cluster_resources())
    names = ", ".join(f"'{prefix}-{g.name}' ({len(g.bundles)} bundles {g.strategy})" for g in specs)
    return f"placement groups {names} wait for {need}; missing free: {free}" + (f"; missing in all: {total}" if total else "")


def create_groups(plan: PlacementPlan, prefix: str, timeout_s: float = 600.0, can_grow: bool = True) -> dict:
    """Create and wait for every group; names are ``<prefix>-<group>`` (shown on the dashboard).
    ``can_grow=False`` (the private local Ray a run starts itself: nothing adds nodes): a plan
    larger than the cluster fails at once instead of waiting."""
    warning = check_fits(plan, ray.cluster_resources())
    if warning and not can_grow:
        raise PlacementTimeout(warning.split(";")[0] + " and this local Ray cannot grow. Raise cluster.local_num_cpus"
                               " / cluster.local_num_gpus, ask for fewer actors, or join a cluster (RAY_ADDRESS)")
    if warning:
        log.warning(warning)
    groups = {spec.name: placement_group(spec.bundles, strategy=spec.strategy, name=f"{prefix}-{spec.name}")
              for spec in plan.groups}
    waiting = {pg.ready(): name for name, pg in groups.items()}
    t0, told, every = time.time(), 0.0, min(STATUS_EVERY_S, timeout_s / 3)
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=min(1.0, every))
        for ref in ready:
            del waiting[ref]
        waited, pending = time.time() - t0, sorted(waiting.values())
        if pending and waited > timeout_s:
            what = missing(plan, prefix, pending)
            remove_groups(groups)
            raise PlacementTimeout(
                f"{what}; not placed after cluster.pg_timeout_s={timeout_s:g}s. Add nodes with these resources, ask "
                "for fewer (cluster.num_trainers, rollout.num_engines, reward.num_workers, cluster.use_gpu), or wait "
                "longer (cluster.pg_timeout_s)")
        if pending and waited - told >= every:
            told = waited
            log.warning("after %.0fs: %s (an autoscaler may be adding nodes; giving up after cluster.pg_timeout_s="
                        "%gs)", waited, missing(plan, prefix, pending), timeout_s)
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
