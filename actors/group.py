"""RankGroup: N trainer-rank actors forming one torch.distributed group, called together.

Thin: sharding is done by library functions (``make_minibatches``, ``shard_minibatches``); the
group only fans calls out and gathers results (rank 0's metrics are the global ones).
"""
from __future__ import annotations

import ray

from miles_ray.training.batching import make_minibatches, shard_minibatches


class RankGroup:
    def __init__(self, actors: list):
        self.actors = actors
        self.world_size = len(actors)

    @staticmethod
    def get(refs: list) -> list:
        """``ray.get`` that fails as soon as any rank fails: the other ranks may be blocked in a
        collective with the dead one and would otherwise hold the caller until a timeout."""
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready[0])
        return ray.get(list(refs))

    def setup(self) -> None:
        addr, port = (None, None)
        if self.world_size > 1:
            addr, port = ray.get(self.actors[0].master_address.remote())
        self.get([a.setup.remote(addr, port) for a in self.actors])

    def call(self, method: str, *args) -> list:
        """The same call on every rank (collectives inside need all ranks); returns object refs."""
        return [getattr(a, method).remote(*args) for a in self.actors]

    def scatter(self, method: str, samples: list, *args) -> list:
        """Each rank gets an even contiguous part of ``samples``; results concatenated in order."""
        parts = shard_minibatches([samples], self.world_size)
        refs = [getattr(a, method).remote(part[0], *args) for a, part in zip(self.actors, parts)]
        return [x for chunk in self.get(refs) for x in chunk]

    def train_step(self, samples: list, num_minibatches: int) -> dict:
        shards = shard_minibatches(make_minibatches(samples, num_minibatches), self.world_size)
        results = self.get([a.train_step.remote(s) for a, s in zip(self.actors, shards)])
        return results[0]

    def sft_step(self, samples: list, lr: float) -> dict:
        shards = shard_minibatches([samples], self.world_size)
        return self.get([a.sft_step.remote(s[0], lr) for a, s in zip(self.actors, shards)])[0]
