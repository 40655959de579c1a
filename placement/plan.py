"""Turn a resource spec into placement-group specs and per-actor bundle assignments.

Pure logic (no Ray): :func:`plan_placement` is unit-tested; :mod:`placement.groups` makes it real.

Layouts
- disaggregated: ``trainer`` PG (PACK, one bundle per rank) and ``rollout`` PG (SPREAD, one bundle
  per engine holding its ``gpus_per_engine`` GPUs: the engine actor gets them all, on one node,
  and its server runs SGLang ``--tp-size gpus_per_engine``), so training and rollout own separate devices;
- colocated: one ``colocated`` PG whose bundles are shared: trainer rank i and the engine whose
  GPUs include bundle i each take half of it (time-shared: the engine releases memory while the
  trainer runs);
- a ``critic`` PG (PACK) when PPO with GAE needs a value model (colocated: it shares the bundles);
- the online draft trainer (speculative rollout): a ``draft`` PG of one bundle (disaggregated) or a
  share of colocated bundle 0;
- an evaluation engine (async runs with ``eval.dedicated_engine``): an ``eval`` PG (PACK) of one
  bundle per eval engine holding its ``gpus_per_engine`` GPUs (colocated too: it is never released);
- both: a ``service`` PG (PACK) holds CPU bundles for the reward workers, the buffer and (engines
  over HTTP) the router.
With ``use_gpu=False`` bundles ask only for CPUs, so the same plan runs on a CPU-only cluster.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GroupSpec:
    name: str
    bundles: list  # list of resource dicts
    strategy: str


@dataclass
class Assignment:
    role: str  # trainer | rollout | reward | buffer
    rank: int
    group: str
    bundle_index: int
    num_cpus: float
    num_gpus: float = 0.0
    bundle_indices: list = field(default_factory=list)  # every bundle whose GPU this actor uses


@dataclass
class PlacementPlan:
    groups: list
    assignments: list

    def for_role(self, role: str) -> list:
        return [a for a in self.assignments if a.role == role]

    def total_resources(self) -> dict:
        total: dict = {}
        for g in self.groups:
            for b in g.bundles:
                for k, v in b.items():
                    total[k] = total.get(k, 0) + v
        return total


def _bundle(cpus: float, gpus: float) -> dict:
    return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}


def plan_placement(cluster, num_engines: int, num_reward_workers: int, num_critics: int = 0,
                   router: bool = False, draft_trainer: bool = False, eval_engines: int = 0) -> PlacementPlan:
    """Plan groups for ``cluster`` (a ClusterConfig) with the given engine, reward and critic counts
    (critic ranks, for PPO with GAE, mirror the trainer ranks), an optional draft trainer and
    ``eval_engines`` engines that only evaluate (role ``eval``)."""
    c, g = cluster.cpus_per_actor, cluster.gpus_per_engine
    gpu = 1.0 if cluster.use_gpu else 0.0
    groups, assign = [], []
    if cluster.colocate:
        n = max(cluster.num_trainers, num_engines * g, num_critics)
        roles = 2 + (1 if num_critics else 0) + int(draft_trainer)  # trainer + engine (+ critic, draft) share bundles
        groups.append(GroupSpec("colocated", [_bundle(roles * c, gpu) for _ in range(n)], "PACK"))
        for r in range(cluster.num_trainers):
            assign.append(Assignment("trainer", r, "colocated", r, c, gpu / roles, [r]))
        for r in range(num_critics):
            assign.append(Assignment("critic", r, "colocated", r, c, gpu / roles, [r]))
        for e in range(num_engines):
            idx = list(range(e * g, (e + 1) * g))
            assign.append(Assignment("rollout", e, "colocated", idx[0], c, gpu / roles, idx))
        if draft_trainer:
            assign.append(Assignment("draft", 0, "colocated", 0, c, gpu / roles, [0]))
    else:
        if cluster.num_trainers:
            groups.append(GroupSpec("trainer", [_bundle(c, gpu) for _ in range(cluster.num_trainers)], "PACK"))
        if num_engines:  # one bundle per engine holding all its GPUs (a bundle is on one node)
            groups.append(GroupSpec("rollout", [_bundle(c, gpu * g) for _ in range(num_engines)], "SPREAD"))
        for r in range(cluster.num_trainers):
            assign.append(Assignment("trainer", r, "trainer", r, c, gpu, [r]))
        if num_critics:
            groups.append(GroupSpec("critic", [_bundle(c, gpu) for _ in range(num_critics)], "PACK"))
            for r in range(num_critics):
                assign.append(Assignment("critic", r, "critic", r, c, gpu, [r]))
        for e in range(num_engines):
            assign.append(Assignment("rollout", e, "rollout", e, c, gpu * g, [e]))
    if draft_trainer and not cluster.colocate:  # its own bundle (one GPU on GPU clusters)
        groups.append(GroupSpec("draft", [_bundle(c, gpu)], "PACK"))
        assign.append(Assignment("draft", 0, "draft", 0, c, gpu, [0]))
    if eval_engines:
        groups.append(GroupSpec("eval", [_bundle(c, gpu * g) for _ in range(eval_engines)], "PACK"))
        assign.extend(Assignment("eval", e, "eval", e, c, gpu * g, [e]) for e in range(eval_engines))
    service = [_bundle(c, 0) for _ in range(num_reward_workers + 1 + int(router))]
    groups.append(GroupSpec("service", service, "PACK"))
    for w in range(num_reward_workers):
        assign.append(Assignment("reward", w, "service", w, c))
    assign.append(Assignment("buffer", 0, "service", num_reward_workers, c))
    if router:
        assign.append(Assignment("router", 0, "service", num_reward_workers + 1, c))
    return PlacementPlan(groups, assign)


def shortfall(need: dict, available: dict) -> str:
    """What ``available`` lacks of ``need`` (resource dicts), as ``"GPU: needs 4, cluster has 0"``
    parts; empty when it fits."""
    short = {k: (v, available.get(k, 0)) for k, v in need.items() if available.get(k, 0) + 1e-9 < v}
    return ", ".join(f"{k}: needs {v:g}, cluster has {have:g}" for k, (v, have) in short.items())


def check_fits(plan: PlacementPlan, available: dict) -> str:
    """A warning when the cluster lacks (today) the resources the plan asks for, else ``""``. Not
    an error: on an autoscaling cluster (KubeRay) the pending placement groups make nodes come."""
    parts = shortfall(plan.total_resources(), available)
    if not parts:
        return ""
    hint = " Set cluster.use_gpu=false to run on CPUs." if "GPU:" in parts else ""
    return (f"The cluster cannot hold this placement plan yet ({parts}); waiting up to cluster.pg_timeout_s for "
            f"an autoscaler to add nodes.{hint}")
