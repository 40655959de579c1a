"""Run reward functions safely: an exception or a hang (timeout) gives that sample the failure
score and is counted, never a crash.

With ``isolate=True`` the function runs in a child process (``python -m miles_ray.rewards.worker``)
that is killed and restarted when a call exceeds the timeout. Without isolation, exceptions are
still caught but a hang cannot be interrupted. Batched functions (service clients, see
:mod:`miles_ray.rewards.registry`) run in this process on the whole list at once.

Invariant: ``scored + errors + timeouts + skipped == len(items)`` for every :meth:`RewardRunner.score`;
``reasons`` counts failures by reason (a :class:`RewardResult` reason, ``error``, ``timeout``,
``rollout_fn``).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import select
import subprocess
import sys
from dataclasses import dataclass, field

from miles_ray.rewards.registry import RewardResult, build_reward_fn

log = logging.getLogger(__name__)


@dataclass
class RewardStats:
    scored: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: int = 0  # samples whose rollout function failed: failure score, reward not called
    reasons: collections.Counter = field(default_factory=collections.Counter)
    messages: list = field(default_factory=list)

    def failed(self, reason: str, message: str) -> None:
        self.reasons[reason] += 1
        if len(self.messages) < 20:
            self.messages.append(message)

    def as_dict(self) -> dict:
        return {"scored": self.scored, "errors": self.errors, "timeouts": self.timeouts, "skipped": self.skipped,
                "reasons": dict(self.reasons)}


def as_result(value) -> RewardResult:
    if isinstance(value, RewardResult):
        return RewardResult(float(value.score), value.reason)
    return RewardResult(float(value))


class RewardRunner:
    def __init__(self, spec: str, timeout_s: float = 10.0, failure_score: float = 0.0, isolate: bool = True,
                 options: dict | None = None):
        self.spec, self.timeout_s, self.failure_score = spec, timeout_s, failure_score
        self.options = dict(options or {})
        self.fn = build_reward_fn(spec, self.options)  # fail fast, in the parent, on a bad spec
        self.batched = bool(getattr(self.fn, "batched", False))
        self.isolate = isolate and not self.batched
        self._proc = None

    # -- child process management ------------------------------------------------------------
    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "miles_ray.rewards.worker", self.spec, json.dumps(self.options, default=str)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                pipe.close()
            self._proc = None

    def close(self) -> None:
        self._kill()

    def _call_isolated(self, prompt: str, response: str, label: str) -> RewardResult:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        self._proc.stdin.write(json.dumps([prompt, response, label]) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout_s)
        if not ready:
            self._kill()
            raise TimeoutError(f"reward function '{self.spec}' took longer than reward.timeout_s={self.timeout_s}")
        line = self._proc.stdout.readline()
        if not line:
            self._kill()
            raise RuntimeError(f"reward worker for '{self.spec}' exited")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return RewardResult(float(reply["score"]), reply.get("reason"))

    # -- public ---------------------------------------------------------------------------------
    def _count(self, result: RewardResult, stats: RewardStats) -> float:
        stats.scored += 1
        if result.reason:
            stats.failed(result.reason, f"{self.spec}: {result.reason}")
        return result.score

    def score_one(self, prompt: str, response: str, label: str, stats: RewardStats) -> float:
        try:
            value = self._call_isolated(prompt, response, label) if self.isolate else as_result(
                self.fn(prompt, response, label))
            return self._count(value, stats)
        except TimeoutError as err:
            stats.timeouts += 1
            stats.failed("timeout", str(err))
        except Exception as err:  # noqa: BLE001 - any user error becomes a failure score
            stats.errors += 1
            stats.failed("error", f"{type(err).__name__}: {err}")
        return self.failure_score

    def _score_batch(self, items: list, stats: RewardStats) -> list[float]:
        try:
            results = list(self.fn(items))
            if len(results) != len(items):
                raise ValueError(f"returned {len(results)} results for {len(items)} items")
        except Exception as err:  # noqa: BLE001
            stats.errors += len(items)
            stats.failed("error", f"{self.spec}: {type(err).__name__}: {err}")
            stats.reasons["error"] += len(items) - 1
            return [self.failure_score] * len(items)
        return [self._count(as_result(r), stats) for r in results]

    def score(self, items: list[tuple[str, str, str]], skip: list[str] | None = None) -> tuple[list[float], RewardStats]:
        """Scores of ``items``; ``skip[i]`` non-empty (a failed rollout function's error) gives item
        ``i`` the failure score without calling the reward."""
        stats, skip = RewardStats(), skip or [""] * len(items)
        scores = [self.failure_score] * len(items)
        to_score = [i for i, why in enumerate(skip) if not why]
        for i, why in enumerate(skip):
            if why:
                stats.skipped += 1
                stats.failed("rollout_fn", why)
        if self.batched:
            got = self._score_batch([items[i] for i in to_score], stats) if to_score else []
        else:
            got = [self.score_one(*items[i], stats) for i in to_score]
        for i, s in zip(to_score, got):
            scores[i] = s
        if stats.errors or stats.timeouts or stats.skipped:
            log.warning("reward '%s': %d errors, %d timeouts, %d failed rollouts out of %d (first: %s)", self.spec,
                        stats.errors, stats.timeouts, stats.skipped, len(items), stats.messages[:1])
        return scores, stats
