"""The state of one run that every step needs, typed, built once by :func:`jobs.train.run`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.cluster import RunActors
from jobs.recovery import Recovery
from jobs.weight_sync import WeightSync
from miles_ray.config import Config
from miles_ray.data import PromptSampler
from miles_ray.rollout import SamplingParams
from miles_ray.utils.tracking import MetricsLogger


@dataclass
class Run:
    cfg: Config
    actors: RunActors
    weights: WeightSync
    recovery: Recovery
    sampler: PromptSampler
    tokenizer: Any  # a transformers tokenizer
    logger: MetricsLogger
    params: SamplingParams

    @classmethod
    def create(cls, cfg: Config, actors: RunActors, sampler: PromptSampler, tokenizer, logger: MetricsLogger) -> "Run":
        weights = WeightSync(actors, cfg.weight_sync.transport)
        return cls(cfg, actors, weights, Recovery(actors, weights, cfg.faults.max_same_failure), sampler, tokenizer, logger,
                   SamplingParams.from_config(cfg.rollout))
