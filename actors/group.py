"""RankGroup: N trainer-rank actors forming one torch.distributed group, called together.

Thin: splitting is done by library functions (``make_minibatches``; ``rank_parts`` balances token
counts across ranks, Karmarkar-Karp); the group only fans calls out and gathers results (rank 0's
metrics are the global ones; per-sample results come back in the callers' order).
"""
from __future__ import annotations

import ray

from miles_ray.training.batching import make_minibatches
from miles_ray.training.packing import rank_parts


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

    def _split(self, samples: list) -> list[list[int]]:
        return rank_parts(samples, self.world_size)

    def scatter(self, method: str, samples: list, *args) -> list:
        """Each rank gets a token-balanced part of ``samples``; results come back in input order."""
        parts = self._split(samples)
        refs = [getattr(a, method).remote([samples[i] for i in part], *args) for a, part in zip(self.actors, parts)]
        out = [None] * len(samples)
        for part, result in zip(parts, self.get(refs)):
            for i, item in zip(part, result):
                out[i] = item
        return out

    def train_step(self, samples: list, num_minibatches: int) -> dict:
        shards = [[] for _ in self.actors]
        for mb in make_minibatches(samples, num_minibatches):
            for rank, part in enumerate(self._split(mb)):
                shards[rank].append([mb[i] for i in part])
        return self.get([a.train_step.remote(s) for a, s in zip(self.actors, shards)])[0]

    def sft_step(self, samples: list, lr: float) -> dict:
        parts = self._split(samples)
        return self.get([a.sft_step.remote([samples[i] for i in p], lr) for a, p in zip(self.actors, parts)])[0]
