"""RewardWorker: scores samples with the configured reward function (errors/timeouts counted)."""
from __future__ import annotations

import ray

from actors.common import ActorBase
from miles_ray.rewards import RewardRunner


@ray.remote
class RewardWorker(ActorBase):
    def __init__(self, spec: str, timeout_s: float, failure_score: float, isolate: bool = True,
                 options: dict | None = None):
        """``options``: the run's ``reward`` section as a dict, plus its services' URLs (factories)."""
        self.runner = RewardRunner(spec, timeout_s, failure_score, isolate, options)

    def score(self, samples: list) -> tuple:
        """Returns (samples with ``reward`` set, stats dict). A sample whose rollout function failed
        (``error``) gets the failure score without a call."""
        items = [(s.prompt, s.response_text, s.label) for s in samples]
        scores, stats = self.runner.score(items, [s.error for s in samples])
        for s, r in zip(samples, scores):
            s.reward = r
        return samples, stats.as_dict()
