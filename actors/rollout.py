"""RolloutEngineActor: one rollout engine with explicit health (ready / released / stale)."""
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
        self.channel = None

    def generate(self, requests: list, n: int, params) -> list:
        return self.engine.generate(requests, n, params)

    def health(self) -> dict:
        return self.engine.health()

    def weight_version(self) -> int:
        return self.engine.weight_version

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    # -- weight loading, one method per transport ------------------------------------------------
    def load_buckets(self, buckets: list, version: int) -> int:
        return self.engine.load_buckets(buckets, version)

    def load_part(self, item) -> None:
        """One streamed bucket: a Bucket (object store) or a (meta, handle) pair (shm / cuda_ipc)."""
        if isinstance(item, tuple):
            from miles_ray.weights.ipc import HandleReader

            if not hasattr(self, "_reader"):
                self._reader = HandleReader()
            item = self._reader.open([item], keep=True)[0]
        self.engine.load_part(item)

    def finish_load(self, version: int) -> int:
        return self.engine.finish_load(version)

    def update_weights(self, weights: dict, version: int) -> int:
        return self.engine.update_weights(weights, version)

    def open_broadcast(self, addr: str, port: int, rank: int, world_size: int) -> bool:
        from miles_ray.weights import BroadcastChannel

        backend = "nccl" if self.cfg.cluster.use_gpu and _cuda() else "gloo"
        self.channel = BroadcastChannel(rank, world_size, addr, port, backend)
        return True

    def receive_broadcast(self, metas: list, version: int) -> int:
        return self.engine.load_buckets(self.channel.receive(metas), version)

    def load_handles(self, handles: list, version: int) -> int:
        from miles_ray.weights.ipc import HandleReader

        if not hasattr(self, "_reader"):
            self._reader = HandleReader()
        return self.engine.load_buckets(self._reader.open(handles), version)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
