"""The synchronous driver's generate calls, with a limit per call and failover.

Each engine gets one ``generate`` call per step (its share of the prompt groups). A call whose
engine died (or restarted and is not refit yet) or that ran past ``rollout.request_timeout_s``
moves at once to a healthy engine - the one with the fewest calls in flight - instead of waiting
for the engine to come back. An engine past the limit is hung: it is killed so that Ray restarts
it. Engines that failed during the step are restored (restart awaited, refit to the served
weights) once the step's samples are in, before the weight sync. With no healthy engine left, the
call waits for its own engine's restart (:meth:`jobs.recovery.Recovery.restore`).

Invariant: every request is answered exactly once: a call's samples are kept only from the call
that returned them; a moved call's old result is never read (its ref is dropped).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray

from jobs.context import Run
from jobs.recovery import is_actor_failure, node_of

log = logging.getLogger("miles_ray.generation")
POLL_S = 0.5  # how often the limits of running calls are checked


@dataclass
class Dispatch:
    """The calls of one step: ``pending`` ref -> (engine, requests, start time)."""
    run: Run
    pending: dict = field(default_factory=dict)
    failed: set = field(default_factory=set)  # engines that died or hung during this step
    moved: int = 0  # calls moved to another engine (not counted: re-sent to their restored engine)
    timeouts: int = 0  # calls past rollout.request_timeout_s

    def send(self, engine: int, chunk: list) -> None:
        e = self.run.actors.engines[engine]
        ref = e.generate.remote(chunk, self.run.cfg.rollout.n_samples_per_prompt, self.run.params)
        self.pending[ref] = (engine, chunk, time.time())

    def healthy(self) -> int | None:
        """The healthy engine with the fewest calls in flight (None: every engine failed)."""
        load = {i: 0 for i in range(len(self.run.actors.engines)) if i not in self.failed}
        for engine, _, _ in self.pending.values():
            if engine in load:
                load[engine] += 1
        return min(load, key=lambda i: (load[i], i)) if load else None

    def move(self, engine: int, chunk: list, why: str) -> None:
        """``engine`` failed its call: send ``chunk`` to a healthy engine, else wait for it to be back."""
        self.failed.add(engine)
        target = self.healthy()
        if target is None:
            self.restore(engine)
            target = engine
        log.warning("rollout-%d %s; its %d prompt groups go to rollout-%d", engine, why, len(chunk), target)
        self.moved += int(target != engine)
        self.send(target, chunk)

    def restore(self, engine: int) -> None:
        t0 = time.time()
        self.run.recovery.restore("rollout", engine)
        self.run.recovery.record(time.time() - t0, "rollout", engine)
        self.failed.discard(engine)
        log.warning("rollout-%d back (restarted, refit) in %.1fs on node %s", engine, time.time() - t0,
                    node_of(self.run.actors.engines[engine]))

    def collect(self, ref, out: list) -> None:
        engine, chunk, _ = self.pending.pop(ref)
        try:
            out.extend(ray.get(ref))
        except Exception as err:  # noqa: BLE001 - only actor failures move; anything else is a bug
            if not is_actor_failure(err):
                raise
            self.move(engine, chunk, f"failed ({type(err).__name__})")

    def expire(self, limit_s: float) -> None:
        """Calls past ``limit_s``: their engine is hung; restart it and move the work."""
        now = time.time()
        for ref, (engine, chunk, t0) in list(self.pending.items()):
            if now - t0 > limit_s and ref in self.pending:
                del self.pending[ref]
                self.timeouts += 1
                ray.kill(self.run.actors.engines[engine], no_restart=False)  # Ray restarts it
                self.move(engine, chunk, f"did not answer within rollout.request_timeout_s={limit_s:g}s (hung: "
                          "restarted)")


def generate(run: Run, per_engine: list[list[dict]]) -> tuple[list, dict]:
    """Samples for every request in ``per_engine`` (engine i's share at index i), and the step's
    ``fault/`` counters (calls moved, calls past the limit)."""
    d, out, limit = Dispatch(run), [], run.cfg.rollout.request_timeout_s
    for i, chunk in enumerate(per_engine):
        if chunk:
            d.send(i, chunk)
    while d.pending:
        ready, _ = ray.wait(list(d.pending), num_returns=1, timeout=POLL_S)
        for ref in ready:
            d.collect(ref, out)
        d.expire(limit)
    for engine in sorted(d.failed):  # back (restarted, refit) before the weight sync
        d.restore(engine)
    return out, {"fault/generate_moved": d.moved, "fault/generate_timeouts": d.timeouts}
