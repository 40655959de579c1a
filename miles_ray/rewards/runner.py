"""Run reward functions safely: an exception or a hang (timeout) gives that sample the failure
score and is counted, never a crash.

With ``isolate=True`` the function runs in a child process (``python -m miles_ray.rewards.worker``)
that is killed and restarted when a call exceeds the timeout. Without isolation, exceptions are
still caught but a hang cannot be interrupted.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
from dataclasses import dataclass, field

from miles_ray.rewards.registry import resolve_reward_fn

log = logging.getLogger(__name__)


@dataclass
class RewardStats:
    scored: int = 0
    errors: int = 0
    timeouts: int = 0
    messages: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"scored": self.scored, "errors": self.errors, "timeouts": self.timeouts}


class RewardRunner:
    def __init__(self, spec: str, timeout_s: float = 10.0, failure_score: float = 0.0, isolate: bool = True):
        self.spec, self.timeout_s, self.failure_score, self.isolate = spec, timeout_s, failure_score, isolate
        self.fn = resolve_reward_fn(spec)  # fail fast, in the parent, on a bad spec
        self._proc = None

    # -- child process management ------------------------------------------------------------
    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "miles_ray.rewards.worker", self.spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        self._kill()

    def _call_isolated(self, prompt: str, response: str, label: str) -> float:
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
        return float(reply["score"])

    # -- public ---------------------------------------------------------------------------------
    def score_one(self, prompt: str, response: str, label: str, stats: RewardStats) -> float:
        try:
            value = self._call_isolated(prompt, response, label) if self.isolate else float(self.fn(prompt, response, label))
            stats.scored += 1
            return value
        except TimeoutError as err:
            stats.timeouts += 1
            stats.messages.append(str(err))
        except Exception as err:  # noqa: BLE001 - any user error becomes a failure score
            stats.errors += 1
            stats.messages.append(f"{type(err).__name__}: {err}")
        return self.failure_score

    def score(self, items: list[tuple[str, str, str]]) -> tuple[list[float], RewardStats]:
        stats = RewardStats()
        scores = [self.score_one(p, r, l, stats) for p, r, l in items]
        if stats.errors or stats.timeouts:
            log.warning("reward '%s': %d errors, %d timeouts out of %d (first: %s)", self.spec, stats.errors,
                        stats.timeouts, len(items), stats.messages[0])
        return scores, stats
