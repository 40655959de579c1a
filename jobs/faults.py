"""Built-in fault injection: kills real actor processes during a run (recovery is
:mod:`jobs.recovery`, which does not know whether a fault was injected).

Config ``faults.kills``: a list of ``{role, rank, step, delay_s}``; at the start of ``step`` a timer
kills that actor's process after ``delay_s`` seconds (Ray restarts engines and reward workers; the
driver rebuilds trainer groups). ``faults.random_kills`` adds that many kills of random engines /
reward workers at random steps (``faults.seed``). Each kill fires once: a step redone after a
restore is not hit again.
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
        self.actors, self.plan = actors, [dict(k) for k in f.kills]
        rng = random.Random(f.seed)
        for _ in range(f.random_kills):
            role = rng.choice(RESTARTABLE)
            count = len(actors.engines) if role == "rollout" else len(actors.rewards)
            self.plan.append({"role": role, "rank": rng.randrange(count), "step": rng.randrange(1, max(2, cfg.total_steps)),
                              "delay_s": rng.uniform(0.0, 0.5)})
        self.killed: list[dict] = []

    def actor(self, role: str, rank: int) -> ActorHandle:
        return {"rollout": self.actors.engines, "reward": self.actors.rewards,
                "trainer": self.actors.policy.actors,
                "critic": self.actors.critic.actors if self.actors.critic else []}[role][rank]

    def on_step(self, step: int) -> None:
        for kill in self.plan:
            if kill["step"] == step and not kill.get("fired"):
                kill["fired"] = True
                threading.Timer(kill.get("delay_s", 0.0), self._kill, args=(kill,)).start()

    def _kill(self, kill: dict) -> None:
        log.warning("fault injection: killing %s-%d at step %d", kill["role"], kill["rank"], kill["step"])
        ray.kill(self.actor(kill["role"], kill["rank"]), no_restart=False)
        self.killed.append({**kill, "time": time.time()})
