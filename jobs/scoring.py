"""Rewards scored while generation runs: each finished call's samples go to a reward worker at once
(round robin), so scoring overlaps the engines still generating instead of waiting for the step's
last sample.

Invariant: every submitted sample comes back from :meth:`Scoring.results` exactly once (a reward
worker that dies is restarted and the lost chunk re-sent, :meth:`jobs.recovery.Recovery.get`).
"""
from __future__ import annotations

import itertools

import ray

from jobs.context import Run


class Scoring:
    def __init__(self, run: Run):
        self.run = run
        self.pending: list = []  # (ref, worker index, samples)
        self._next = itertools.count()

    def submit(self, samples: list) -> None:
        """Send ``samples`` (one finished generate call) to the next reward worker."""
        if not samples:
            return
        workers = self.run.actors.rewards
        i = next(self._next) % len(workers)
        self.pending.append((workers[i].score.remote(samples), i, samples))

    def wait(self, entry) -> tuple[list, dict]:
        """One submitted chunk, scored (its worker recovered and the chunk re-sent if it died)."""
        ref, i, samples = entry
        workers = self.run.actors.rewards
        return self.run.recovery.get(ref, lambda: workers[i].score.remote(samples), "reward", i)

    def results(self) -> tuple[list, dict]:
        """Every submitted sample with its reward, and the summed reward counters."""
        from jobs.steps import add_reward_stats

        out, stats = [], {}
        for entry in self.pending:
            scored, st = self.wait(entry)
            out.extend(scored)
            add_reward_stats(stats, st)
        self.pending = []
        return out, stats
