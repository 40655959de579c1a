"""Built-in fault injection (recovery is :mod:`jobs.recovery`, which does not know whether a
fault was injected).

Config ``faults.kills``: a list of ``{role, rank, step, delay_s, kind, seconds}``; at the start of
``step`` the fault ``kind`` hits that actor:

- ``kill`` (default): a timer kills the actor's process after ``delay_s`` seconds (Ray restarts
  engines and reward workers; the driver rebuilds trainer groups). Fires once: a step redone after
  a restore is not hit again.
- ``raise``: the actor's next work call raises (a deterministic bug): armed again every time the
  step runs, also when it is redone after a restore (``faults.max_same_failure`` stops the run).
- ``hang``: the actor's next work call sleeps ``seconds`` first (a hung engine). Fires once.

``faults.random_kills`` adds that many kills of random engines / reward workers at random steps
(``faults.seed``). :meth:`FaultInjector.counts` says how many were requested and fired.
"""
from __future__ import annotations

import logging
import random
import threading
import time

import ray
from ray.actor import ActorHandle

from jobs.cluster import RunActors
from miles_ray.config import Config

log = logging.getLogger("miles_ray.faults")
RESTARTABLE = ("rollout", "reward")


class FaultInjector:
    def __init__(self, cfg: Config, actors: RunActors):
        f = cfg.faults
        self.actors, self.plan = actors, [{"kind": "kill", **k} for k in f.kills]
        rng = random.Random(f.seed)
        for _ in range(f.random_kills):
            role = rng.choice(RESTARTABLE)
            count = len(actors.engines) if role == "rollout" else len(actors.rewards)
            self.plan.append({"kind": "kill", "role": role, "rank": rng.randrange(count),
                              "step": rng.randrange(1, max(2, cfg.total_steps)), "delay_s": rng.uniform(0.0, 0.5)})
        self.killed: list[dict] = []  # every fault that hit its actor, with the time it did

    def actor(self, role: str, rank: int) -> ActorHandle:
        return {"rollout": self.actors.engines, "reward": self.actors.rewards,
                "trainer": self.actors.policy.actors,
                "critic": self.actors.critic.actors if self.actors.critic else []}[role][rank]

    def on_step(self, step: int) -> None:
        for fault in self.plan:
            if fault["step"] == step and (fault["kind"] == "raise" or not fault.get("fired")):
                fault["fired"] = True
                ACTIONS[fault["kind"]](self, fault)

    def counts(self, recoveries: list[dict]) -> dict:
        """``fault/requested`` (faults planned), ``fault/fired`` (those that hit their actor; a
        repeated ``raise`` counts once) and ``fault/recovered``: fired faults matched to a later
        recovery of their actor (:func:`recovered`), or restartable actors killed while idle that
        are back in service without the driver noticing (:meth:`back_in_service`)."""
        fired = [f for f in self.plan if f.get("fired")]
        matched = recovered(self.killed, recoveries)
        back = [f for i, f in enumerate(self.killed) if i not in matched and self.back_in_service(f)]
        return {"fault/requested": len(self.plan), "fault/fired": len(fired),
                "fault/recovered": len(matched) + len(back)}

    def back_in_service(self, fault: dict, timeout_s: float = 5.0) -> bool:
        """A killed engine or reward worker answers again (an engine: READY, refit); remembered."""
        if fault["kind"] != "kill" or fault["role"] not in RESTARTABLE:
            return False
        if not fault.get("back"):
            actor = self.actor(fault["role"], fault["rank"])
            try:
                probe = actor.health.remote() if fault["role"] == "rollout" else actor.ready.remote()
                answer = ray.get(probe, timeout=timeout_s)
                fault["back"] = answer is True or (isinstance(answer, dict) and answer.get("state") == "ready")
            except Exception:  # noqa: BLE001 - not back (yet)
                return False
        return fault["back"]

    def kill_later(self, fault: dict) -> None:
        threading.Timer(fault.get("delay_s", 0.0), self._kill, args=(fault,)).start()

    def _kill(self, fault: dict) -> None:
        log.warning("fault injection: killing %s-%d at step %d", fault["role"], fault["rank"], fault["step"])
        ray.kill(self.actor(fault["role"], fault["rank"]), no_restart=False)
        self.killed.append({**fault, "time": time.time()})

    def arm(self, fault: dict) -> None:
        """Synchronous: armed before the step's work is sent to the actor."""
        log.warning("fault injection: %s-%d will %s at step %d", fault["role"], fault["rank"], fault["kind"],
                    fault["step"])
        try:
            ray.get(self.actor(fault["role"], fault["rank"]).arm_fault.remote(fault["kind"], fault.get("seconds", 0.0)))
        except ray.exceptions.RayError as err:  # the actor is down (restarting): this fault does not fire
            log.warning("fault injection: could not arm %s-%d: %r", fault["role"], fault["rank"], err)
            fault["fired"] = False
            return
        self.killed.append({**fault, "time": time.time()})


ACTIONS = {"kill": FaultInjector.kill_later, "raise": FaultInjector.arm, "hang": FaultInjector.arm}


def _matches(fault: dict, event: dict) -> bool:
    role = "trainer" if fault["role"] in ("trainer", "critic") else fault["role"]  # groups rebuild together
    return (event["role"] == role and event["time"] >= fault["time"]
            and (event["index"] is None or role == "trainer" or event["index"] == fault["rank"]))


def recovered(fired: list[dict], events: list[dict]) -> set[int]:
    """Indexes of ``fired`` faults followed by a recovery of the same actor
    (:attr:`jobs.recovery.Recovery.events`); each event accounts for at most one fault, earliest first."""
    used, matched = set(), set()
    for i, fault in sorted(enumerate(fired), key=lambda x: x[1]["time"]):
        match = next((k for k, e in enumerate(events) if k not in used and _matches(fault, e)), None)
        if match is not None:
            used.add(match)
            matched.add(i)
    return matched
