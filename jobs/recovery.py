"""Production recovery, the same with or without injected faults (:mod:`jobs.faults` only kills).

- Engines and reward workers restart automatically (Ray ``max_restarts=-1``). :meth:`Recovery.get`
  waits for a dead actor's restart, refits a restarted engine with the weights it must serve
  (:attr:`Recovery.version`: it is STALE until then) and re-sends the lost call.
- :meth:`Recovery.sync` is a weight sync that survives an engine dying during it.
- A dead trainer or critic rank (ranks are not restarted: survivors hang in collectives):
  :meth:`Recovery.rebuild_trainers` kills the group, starts a new one on the same bundles and
  restores the latest checkpoint.

Recovery waits for a restarted actor as long as ``WAIT_S``; while its placement group has no node
(node lost, no spare resources) it logs every ``STATUS_EVERY_S`` which group waits for what.
Counters: ``recoveries`` (each recovered failure once) and their durations, in every metrics row;
:attr:`Recovery.events` says which actor each one was (``fault/recovered`` matches them to faults).

A trainer failure is not always a dead rank: a rank that raises (a bug, an OOM) while the others
wait in a collective looks the same. :class:`FailureStreak`: the same failure again before the run
got past the step it happened at is "in a row"; ``faults.max_same_failure`` in a row stop the run
with that error (:class:`RepeatedFailure`) instead of rebuilding forever.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import ray
from ray.actor import ActorHandle

from jobs import checkpointing
from jobs.cluster import RunActors
from jobs.weight_sync import WeightSync
from miles_ray import versioning
from miles_ray.config import Config

log = logging.getLogger("miles_ray.recovery")
WAIT_S = 900.0  # a restarted actor may wait this long for a node with its resources
STATUS_EVERY_S = 5.0


class RepeatedFailure(RuntimeError):
    """The same trainer failure ``faults.max_same_failure`` times in a row: not a dead rank."""


def failure_signature(err: BaseException) -> str:
    """What failed, without what changes between attempts (actor ids, pids, tracebacks): the
    application error's type and first line, or the kind of actor death."""
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    if cause is not None and not isinstance(cause, ray.exceptions.RayActorError):
        lines = str(cause).strip().splitlines() or [""]
        return f"{type(cause).__name__}: {lines[0]}"
    return type(err).__name__


class FailureStreak:
    """Consecutive trainer failures with one signature. Invariant: ``count`` failures of
    ``signature`` happened since the run last completed the step ``step`` they happened at."""

    def __init__(self, limit: int):
        self.limit, self.signature, self.step, self.count = limit, None, -1, 0

    def failed(self, err: BaseException, step: int) -> None:
        """Record a failure at ``step``; raises :class:`RepeatedFailure` (from ``err``) at the limit."""
        signature = failure_signature(err)
        self.count = self.count + 1 if signature == self.signature else 1
        self.signature, self.step = signature, max(step, self.step)
        if self.count >= self.limit:
            raise RepeatedFailure(
                f"the trainer failed {self.count} times in a row at step {step} with the same error, so it is not a "
                f"lost rank but a failure that repeats (a bug, an out-of-memory): {signature}. Fix it, or raise "
                f"faults.max_same_failure={self.limit} to rebuild more often") from err

    def completed(self, step: int) -> None:
        """``step`` completed: a failure at or before it is behind the run."""
        if step >= self.step:
            self.signature, self.step, self.count = None, -1, 0


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


def wait_alive(actor: ActorHandle, timeout_s: float = WAIT_S, name: str = "actor", groups: dict | None = None) -> float:
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


def node_of(actor: ActorHandle) -> str:
    """The node an actor runs on (logged after a recovery: a restart may land on another node)."""
    try:
        return ray.get(actor.where.remote(), timeout=30)["node_id"]
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"


class Recovery:
    """Thread-safe for the async driver's rollout thread: every weight load into engines (syncs,
    refits) holds :attr:`sync_lock`."""

    def __init__(self, actors: RunActors, weights: WeightSync, max_same_failure: int = 2):
        self.actors, self.weights = actors, weights
        self.version = versioning.INITIAL  # what the engines serve; a restarted engine is refit to it
        self.count = 0
        self.seconds: list[float] = []
        self.events: list[dict] = []  # {role, index (None: every actor of the role), time}
        self.sync_lock = threading.Lock()
        self.streak = FailureStreak(max_same_failure)

    def record(self, seconds: float, role: str, index: int | None = None) -> None:
        """One recovered failure of ``role``-``index`` that took ``seconds``."""
        self.count += 1
        self.seconds.append(seconds)
        self.events.append({"role": role, "index": index, "time": time.time()})

    def metrics(self) -> dict:
        return {"recoveries": self.count, "recovery_s_max": max(self.seconds, default=0.0),
                "recovery_s_each": [round(x, 3) for x in self.seconds]}

    # -- engines and reward workers ------------------------------------------------------------
    def get(self, ref, resubmit: Callable, role: str, index: int, attempts: int = 6):
        """``ray.get(ref)``; if the actor died, wait for its restart (refit an engine) and get
        ``resubmit()`` instead, up to ``attempts`` times."""
        for attempt in range(attempts):
            try:
                return ray.get(ref)
            except Exception as err:  # noqa: BLE001 - only actor failures are recovered
                if not is_actor_failure(err) or attempt == attempts - 1:
                    raise
                t0 = time.time()
                self.restore(role, index)
                self.record(time.time() - t0, role, index)
                log.warning("%s-%d recovered in %.1fs on node %s; re-sending its work", role, index, self.seconds[-1],
                            node_of(self._actor(role, index)))
                ref = resubmit()

    def restore(self, role: str, index: int) -> None:
        """Wait for a restarted engine or reward worker; refit an engine to :attr:`version`."""
        actor = self._actor(role, index)
        wait_alive(actor, name=f"{role}-{index}", groups=self.actors.groups)
        if role == "rollout":
            with self.sync_lock:
                self.weights.refit([actor], self.version)

    def _actor(self, role: str, index: int) -> ActorHandle:
        return (self.actors.engines if role == "rollout" else self.actors.rewards)[index]

    def engine_rng(self) -> list:
        """Every engine's sampling RNG state (for checkpoints); a dead engine is waited for and refit."""
        refs = [e.rng_state.remote() for e in self.actors.engines]
        return [self.get(ref, lambda e=e: e.rng_state.remote(), "rollout", i)
                for i, (e, ref) in enumerate(zip(self.actors.engines, refs))]

    def sync(self, version: int) -> float:
        """Weight sync of ``version`` under the lock, surviving an engine that dies during it: wait
        for the restarted engines, refit all over the object store, re-open transport groups on
        the next sync. Afterwards the engines serve (and a restarted one is refit to) ``version``."""
        with self.sync_lock:
            t0 = time.time()
            try:
                seconds = self.weights.sync(version)
            except Exception as err:  # noqa: BLE001
                if not is_actor_failure(err):
                    raise
                for i, engine in enumerate(self.actors.engines):
                    wait_alive(engine, name=f"rollout-{i}", groups=self.actors.groups)
                self.weights.refit(self.actors.engines, version)
                self.weights.reset()  # a restarted engine lost its broadcast / shm state
                seconds = time.time() - t0
                self.record(seconds, "rollout")
                log.warning("weight sync recovered after an engine restart in %.1fs; engines on nodes %s", seconds,
                            [node_of(e) for e in self.actors.engines])
            self.version = version
            return seconds

    # -- trainer ranks --------------------------------------------------------------------------
    def trainer_failed(self, err: BaseException) -> bool:
        """True when ``err`` comes from a dead trainer or critic rank (engines and reward workers
        recover inside the step; trainer ranks have no restarts: their groups are rebuilt)."""
        if not isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)):
            return False
        for rank in self.actors.trainer_ranks():
            try:
                ray.get(rank.ready.remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return True
        return False

    def respawn_trainers(self, cfg: Config) -> Path:
        """New trainer (and critic) groups on the same bundles; returns the checkpoint to restore
        (the caller restores it: the async driver also refills its pump from it)."""
        path = checkpointing.ckpt.latest(checkpointing.root(cfg))
        if path is None:
            raise RuntimeError("a trainer rank died and there is no checkpoint to restore (checkpoint.every=0); set "
                               "checkpoint.every > 0 (a fresh run then also checkpoints step 0)")
        self.actors.respawn_trainers(self.wait_ranks)
        self.weights.reset()  # the broadcast group belonged to the old rank 0
        return path

    def wait_ranks(self, ranks: list) -> None:
        """New trainer ranks up (their placement group may wait for a node: logged)."""
        for i, rank in enumerate(ranks):
            wait_alive(rank, name=f"trainer rank {i}", groups=self.actors.groups)
        log.warning("new trainer ranks on nodes %s", [node_of(r) for r in ranks])

    def rebuild_trainers(self, cfg: Config, sampler, logger) -> int:
        """Replace every trainer rank, restore the latest checkpoint, refit the engines and rewind
        the metrics. Returns the step to continue from."""
        t0 = time.time()
        path = self.respawn_trainers(cfg)
        meta = checkpointing.restore(cfg, self.actors, sampler, path)
        self.sync(meta["version"])
        logger.rewind(meta["step"])
        self.record(time.time() - t0, "trainer")
        log.warning("trainer group rebuilt from %s in %.1fs", path, time.time() - t0)
        return meta["step"]
