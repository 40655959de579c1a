"""RolloutEngineActor: one rollout engine, reporting the weight version it serves."""
from __future__ import annotations

import ray

from actors.common import ActorBase, setup_worker_process
from miles_ray.config import Config


@ray.remote
class RolloutEngineActor(ActorBase):
    def __init__(self, cfg: dict, rank: int = 0):
        self.cfg = Config.model_validate(cfg)
        setup_worker_process(self.cfg.seed + 1000 + rank)
        from miles_ray.rollout import make_engine

        self.rank = rank
        self.engine = make_engine(self.cfg.rollout.backend, model_spec=self.cfg.model.path,
                                  dtype=self.cfg.model.dtype, tiny_cache_dir=self.cfg.model.tiny_cache_dir,
                                  seed=self.cfg.seed + 1000 + rank)

    def generate(self, requests: list, n: int, params) -> list:
        return self.engine.generate(requests, n, params)

    def update_weights(self, weights: dict, version: int) -> int:
        return self.engine.update_weights(weights, version)

    def weight_version(self) -> int:
        return self.engine.weight_version
