"""DraftTrainerActor: the online draft-model trainer for speculative rollout, in its own bundle.
It trains on each step's rollouts while the policy trains, and hands its weights to the driver,
which pushes them to the engines together with the policy weights."""
from __future__ import annotations

import ray

from actors.common import ActorBase, setup_worker_process
from miles_ray.config import Config


@ray.remote
class DraftTrainerActor(ActorBase):
    def __init__(self, cfg: dict):
        from miles_ray.training.fsdp.draft import DraftTrainer

        self.cfg = Config.model_validate(cfg)
        setup_worker_process(self.cfg.seed + 2000)
        d, m = self.cfg.draft, self.cfg.model
        self.trainer = DraftTrainer(d.path, m.path, self.cfg.train, d.lr, m.dtype, m.tiny_cache_dir, self.cfg.seed)

    def train(self, samples: list) -> dict:
        return self.trainer.train_on(samples, self.cfg.draft.epochs)

    def get_weights(self) -> dict:
        return self.trainer.get_weights()

    def save_state(self, folder: str) -> str:
        self.trainer.save_checkpoint(f"{folder}/draft")
        return f"{folder}/draft"

    def load_state(self, folder: str) -> bool:
        self.trainer.load_checkpoint(f"{folder}/draft")
        return True
