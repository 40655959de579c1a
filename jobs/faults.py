"""Built-in fault injection and recovery helpers for the drivers.

Config ``faults.kills``: a list of ``{role, rank, step, delay_s}``; at the start of ``step`` a timer
kills that actor's process after ``delay_s`` seconds (Ray restarts it). ``faults.random_kills``
adds that many kills of random engines / reward workers at random steps (``faults.seed``).

Recovery waits for a restarted actor as long as ``WAIT_S``; while its placement group has no node
(node lost, no spare resources) it logs every ``STATUS_EVERY_S`` which group waits for what.
The ledger (``ledger_metrics`` in every metrics row, checked by ``ledger_counts``) records which
groups, prompts and how many samples each step trained on.
"""
from __future__ import annotations

import logging
import random
import threading
import time

import ray

log = logging.getLogger("miles_ray.faults")
RESTARTABLE = ("rollout", "reward")
WAIT_S = 900.0  # a restarted actor may wait this long for a node with its resources
STATUS_EVERY_S = 5.0


class FaultInjector:
    def __init__(self, cfg, actors):
        f = cfg.faults
        self.actors, self.plan = actors, [dict(k) for k in f.kills]
        rng = random.Random(f.seed)
        for _ in range(f.random_kills):
            role = rng.choice(RESTARTABLE)
            count = len(actors.engines) if role == "rollout" else len(actors.rewards)
            self.plan.append({"role": role, "rank": rng.randrange(count), "step": rng.randrange(1, max(2, cfg.total_steps)),
                              "delay_s": rng.uniform(0.0, 0.5)})
        self.killed: list[dict] = []

    def actor(self, role: str, rank: int):
        return {"rollout": self.actors.engines, "reward": self.actors.rewards,
                "trainer": self.actors.policy.actors,
                "critic": self.actors.critic.actors if self.actors.critic else []}[role][rank]

    def on_step(self, step: int) -> None:
        for kill in self.plan:
            if kill["step"] == step and not kill.get("fired"):  # once: a step redone after a restore is not hit again
                kill["fired"] = True
                threading.Timer(kill.get("delay_s", 0.0), self._kill, args=(kill,)).start()

    def _kill(self, kill: dict) -> None:
        log.warning("fault injection: killing %s-%d at step %d", kill["role"], kill["rank"], kill["step"])
        ray.kill(self.actor(kill["role"], kill["rank"]), no_restart=False)
        self.killed.append({**kill, "time": time.time()})


def is_actor_failure(err: BaseException) -> bool:
    """A dead/restarting actor (or its node), results lost with a node, or a restarted engine
    that is not refit yet."""
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError)):
        return True
    return isinstance(err, ray.exceptions.RayTaskError) and "EngineNotReady" in str(err)


def resource_status(groups: dict | None) -> str:
    """Which placement groups are not in place (a node was lost) and what they need."""
    from ray.util import placement_group_table

    waiting = []
    for role, pg in (groups or {}).items():
        info = placement_group_table(pg)
        if info.get("state") != "CREATED":
            waiting.append(f"placement group '{info.get('name')}' ({role}) is {info.get('state')}, "
                           f"bundles {info.get('bundles')}")
    if not waiting:
        return ("its placement group is in place: the actor is restarting (or its node died and Ray has not "
                "noticed yet: it reschedules the bundles once the node's health checks fail)")
    free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    return f"waiting for resources: {'; '.join(waiting)}; the cluster has {free} free"


def wait_alive(actor, timeout_s: float = WAIT_S, name: str = "actor", groups: dict | None = None) -> float:
    """Block until a restarted actor answers; returns the seconds it took. Logs a status (what
    the actor's placement group waits for) every ``STATUS_EVERY_S``."""
    t0, told = time.time(), 0.0
    while True:
        try:
            ray.get(actor.ready.remote(), timeout=STATUS_EVERY_S)
            return time.time() - t0
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            waited = time.time() - t0
            if waited > timeout_s:
                raise
            if waited - told >= STATUS_EVERY_S:
                told = waited
                log.warning("%s is not back after %.0fs: %s", name, waited, resource_status(groups))
            time.sleep(0.2)


class Recovery:
    """Re-sends work of a dead actor once Ray has restarted it; an engine is refit with the
    current weights (``version``, what the engines serve) first: it is STALE until then. Counts
    recoveries and their durations. Thread-safe for the async driver's rollout thread."""

    def __init__(self, actors):
        self.actors, self.version, self.count, self.seconds = actors, 1, 0, []
        # held around every weight load into engines: the async driver's rollout thread refits a
        # restarted engine while the main thread may be syncing all of them
        self.sync_lock = threading.Lock()

    def get(self, ref, resubmit, role: str, index: int, attempts: int = 6):
        for attempt in range(attempts):
            try:
                return ray.get(ref)
            except Exception as err:  # noqa: BLE001 - only actor failures are recovered
                if not is_actor_failure(err) or attempt == attempts - 1:
                    raise
                t0 = time.time()
                self._recover(role, index)
                self.count += 1
                self.seconds.append(time.time() - t0)
                log.warning("%s-%d recovered in %.1fs on node %s; re-sending its work", role, index, self.seconds[-1],
                            _node(self._actor(role, index)))
                ref = resubmit()

    def _recover(self, role: str, index: int) -> None:
        from jobs.cluster import RunActors
        from jobs.weight_sync import WeightSync

        actor = self._actor(role, index)
        wait_alive(actor, name=f"{role}-{index}", groups=self.actors.groups)
        if role == "rollout":
            view = RunActors(self.actors.policy, [actor], [], self.actors.buffer, draft=self.actors.draft)
            with self.sync_lock:
                WeightSync(view, "object_store").sync(self.version)

    def _actor(self, role: str, index: int):
        return (self.actors.engines if role == "rollout" else self.actors.rewards)[index]

    def metrics(self) -> dict:
        return {"recoveries": self.count, "recovery_s_max": max(self.seconds, default=0.0),
                "recovery_s_each": [round(x, 3) for x in self.seconds]}


def sync_resilient(weights, version: int, recovery: "Recovery") -> float:
    """Weight sync that survives an engine dying during it: wait for the restarted engines, refit
    every engine over the object store, and re-open transport groups on the next sync."""
    t0 = time.time()
    try:
        return weights.sync(version)
    except Exception as err:  # noqa: BLE001
        if not is_actor_failure(err):
            raise
        from jobs.weight_sync import WeightSync

        for i, engine in enumerate(weights.actors.engines):
            wait_alive(engine, name=f"rollout-{i}", groups=weights.actors.groups)
        WeightSync(weights.actors, "object_store").sync(version)
        weights._opened = False  # a restarted engine lost its broadcast / shm state
        recovery.count += 1
        recovery.seconds.append(time.time() - t0)
        log.warning("weight sync recovered after an engine restart in %.1fs; engines on nodes %s", recovery.seconds[-1],
                    [_node(e) for e in weights.actors.engines])
        return time.time() - t0


def _node(actor) -> str:
    """The node an actor runs on (logged after a recovery: a restart may land on another node)."""
    try:
        return ray.get(actor.where.remote(), timeout=30)["node_id"]
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"


def trainer_failed(actors, err: BaseException) -> bool:
    """True when ``err`` comes from a dead trainer or critic rank (engines and reward workers
    recover inside the step; trainer ranks have no restarts: their groups are rebuilt)."""
    if not isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)):
        return False
    for rank in actors.policy.actors + (actors.critic.actors if actors.critic else []):
        try:
            ray.get(rank.ready.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return True
    return False


def latest_checkpoint(cfg):
    from jobs import checkpointing

    path = checkpointing.ckpt.latest(checkpointing.root(cfg))
    if path is None:
        raise RuntimeError("a trainer rank died and there is no checkpoint to restore; set checkpoint.every")
    return path


def respawn_trainers(actors) -> None:
    """Kill every policy (and critic) rank (survivors are stuck in a collective with the dead one)
    and start new groups on the same bundles (fresh actor names)."""
    from actors import RankGroup

    generation = actors.recovery.count + 1
    for rank in actors.policy.actors + (actors.critic.actors if actors.critic else []):
        ray.kill(rank)
    actors.policy = RankGroup(actors.spawn_policy(generation))
    actors.policy.setup()
    if actors.critic is not None:
        actors.critic = RankGroup(actors.spawn_critic(generation))
        actors.critic.setup()


def rebuild_trainers(cfg, actors, sampler, weights, logger) -> tuple[int, int]:
    """Replace every trainer rank on the same bundles, restore the latest checkpoint, refit the
    engines and rewind the metrics. Returns (step, version) to continue from."""
    from jobs import checkpointing

    path = latest_checkpoint(cfg)
    t0 = time.time()
    respawn_trainers(actors)
    meta = checkpointing.restore(cfg, actors, sampler, path)
    weights._opened = False  # the broadcast group belonged to the old rank 0
    weights.sync(meta["version"])
    logger.rewind(meta["step"])
    actors.recovery.count += 1
    actors.recovery.seconds.append(time.time() - t0)
    log.warning("trainer group rebuilt from %s in %.1fs", path, time.time() - t0)
    return meta["step"], meta["version"]


def ledger_metrics(samples: list) -> dict:
    """What a step trained on: group ids (sorted), each group's prompt row and its sample count."""
    groups: dict = {}
    for s in samples:
        groups.setdefault(s.group_id, [s.prompt_index, 0])[1] += 1
    ids = sorted(groups)
    return {"ledger_groups": ids, "ledger_prompts": [groups[g][0] for g in ids],
            "ledger_sizes": [groups[g][1] for g in ids]}


def ledger_counts(rows: list, n_per_group: int, expected_groups=None) -> dict:
    """Check metrics rows (one run, resumed or not): ``steps`` distinct steps, ``duplicates`` =
    rows of a step seen before + samples trained beyond ``n_per_group`` per group (a group in two
    steps counts), ``lost`` = samples missing from groups trained short, or from ``expected_groups``
    that were never trained."""
    import collections

    per_group: collections.Counter = collections.Counter()
    for r in rows:
        for gid, size in zip(r["ledger_groups"], r["ledger_sizes"]):
            per_group[gid] += size
    steps = collections.Counter(r["step"] for r in rows)
    expected = set(per_group) if expected_groups is None else set(expected_groups)
    lost = sum(max(0, n_per_group - per_group[g]) for g in expected | set(per_group))
    dup = sum(max(0, c - n_per_group) for c in per_group.values()) + sum(c - 1 for c in steps.values())
    return {"steps": len(steps), "lost": lost, "duplicates": dup, "groups": len(per_group)}
