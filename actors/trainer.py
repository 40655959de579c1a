"""TrainerActor: one policy-trainer rank."""
from __future__ import annotations

import ray

from actors.common import ActorBase, setup_worker_process
from miles_ray.config import Config


@ray.remote
class TrainerActor(ActorBase):
    def __init__(self, cfg: dict, rank: int = 0):
        self.cfg = Config.model_validate(cfg)
        setup_worker_process(self.cfg.seed + rank)
        from miles_ray.training import PolicyTrainer

        self.rank = rank
        self.trainer = PolicyTrainer(
            self.cfg.model.path, self.cfg.train, self.cfg.algorithm, dtype=self.cfg.model.dtype,
            tiny_cache_dir=self.cfg.model.tiny_cache_dir, temperature=self.cfg.rollout.temperature,
            seed=self.cfg.seed,
        )

    def sft_step(self, samples, lr=None) -> dict:
        return self.trainer.sft_step(samples, lr=lr)

    def train_step(self, samples) -> dict:
        return self.trainer.train_step(samples)

    def compute_logprobs(self, samples) -> list:
        return self.trainer.compute_logprobs(samples)

    def get_weights(self) -> dict:
        return self.trainer.get_weights()

    def version(self) -> int:
        return self.trainer.version
