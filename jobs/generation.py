"""The synchronous driver's generate calls, with a limit per call and failover.

Each engine gets one ``generate_stream`` call per step (its share of the prompt groups, admitted at
once so that sampling does not depend on timing); the call yields each group as soon as its samples
are done, and ``on_done`` hands them to the reward workers while the rest generate. A call whose
engine died (or restarted and is not refit yet) or that ran past ``rollout.request_timeout_s``
moves at once to a healthy engine - the one with the fewest calls in flight - instead of waiting
for the engine to come back. An engine past the limit is hung: it is killed so that Ray restarts
it. Engines that failed during the step are restored (restart awaited, refit to the served
weights) once the step's samples are in, before the weight sync. With no healthy engine left, the
call waits for its own engine's restart (:meth:`jobs.recovery.Recovery.restore`).

Invariant: every request is answered exactly once: a group's samples are kept only from the call
that yielded them; a failed call moves only the groups it had not yielded yet, and a moved call's
old stream is never read again (it is dropped).
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
class Call:
    engine: int
    requests: list
    start: float
    done: set = field(default_factory=set)  # group ids already yielded

    @property
    def remaining(self) -> list:
        return [r for r in self.requests if r["group_id"] not in self.done]


@dataclass
class Dispatch:
    """The calls of one step: ``pending`` stream -> :class:`Call`."""
    run: Run
    pending: dict = field(default_factory=dict)
    failed: set = field(default_factory=set)  # engines that died or hung during this step
    moved: int = 0  # calls moved to another engine (not counted: re-sent to their restored engine)
    timeouts: int = 0  # calls past rollout.request_timeout_s

    def send(self, engine: int, chunk: list) -> None:
        e = self.run.actors.engines[engine]
        stream = e.generate_stream.options(num_returns="streaming").remote(
            chunk, self.run.cfg.rollout.n_samples_per_prompt, self.run.params)
        self.pending[stream] = Call(engine, chunk, time.time())

    def healthy(self) -> int | None:
        """The healthy engine with the fewest calls in flight (None: every engine failed)."""
        load = {i: 0 for i in range(len(self.run.actors.engines)) if i not in self.failed}
        for call in self.pending.values():
            if call.engine in load:
                load[call.engine] += 1
        return min(load, key=lambda i: (load[i], i)) if load else None

    def move(self, engine: int, chunk: list, why: str) -> None:
        """``engine`` failed its call: send ``chunk`` to a healthy engine, else wait for it to be back."""
        self.failed.add(engine)
        if not chunk:  # it had yielded every group: nothing to move (restored after the step)
            return
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

    def collect(self, stream, out: list, on_done=None) -> None:
        """The next group of a ready stream (or its end)."""
        call = self.pending[stream]
        try:
            samples = ray.get(next(stream))
        except StopIteration:
            del self.pending[stream]
            return
        except Exception as err:  # noqa: BLE001 - only actor failures move; anything else is a bug
            if not is_actor_failure(err):
                raise
            del self.pending[stream]
            self.move(call.engine, call.remaining, f"failed ({type(err).__name__})")
            return
        call.done.update(s.group_id for s in samples)
        out.extend(samples)
        if on_done is not None:
            on_done(samples)

    def expire(self, limit_s: float) -> None:
        """Calls past ``limit_s``: their engine is hung; restart it and move the work."""
        now = time.time()
        for stream, call in list(self.pending.items()):
            if now - call.start > limit_s and stream in self.pending:
                del self.pending[stream]
                self.timeouts += 1
                ray.kill(self.run.actors.engines[call.engine], no_restart=False)  # Ray restarts it
                self.move(call.engine, call.remaining, f"did not answer within rollout.request_timeout_s="
                          f"{limit_s:g}s (hung: restarted)")


def generate(run: Run, per_engine: list[list[dict]], on_done=None) -> tuple[list, dict]:
    """Samples for every request in ``per_engine`` (engine i's share at index i), and the step's
    ``fault/`` counters (calls moved, calls past the limit). ``on_done(samples)`` gets each group
    as it arrives."""
    d, out, limit = Dispatch(run), [], run.cfg.rollout.request_timeout_s
    for i, chunk in enumerate(per_engine):
        if chunk:
            d.send(i, chunk)
    while d.pending:
        ready, _ = ray.wait(list(d.pending), num_returns=1, timeout=POLL_S)
        for stream in ready:
            d.collect(stream, out, on_done)
        d.expire(limit)
    for engine in sorted(d.failed):  # back (restarted, refit) before the weight sync
        d.restore(engine)
    return out, {"fault/generate_moved": d.moved, "fault/generate_timeouts": d.timeouts}
