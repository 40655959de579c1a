"""BufferActor: holds samples between rollout and training."""
from __future__ import annotations

import ray

from actors.common import ActorBase
from miles_ray.buffer import SampleBuffer


@ray.remote
class BufferActor(ActorBase):
    def __init__(self):
        self.buffer = SampleBuffer()

    def put(self, samples: list) -> int:
        return self.buffer.put(samples)

    def get(self, n: int) -> list:
        return self.buffer.get(n)

    def stats(self) -> dict:
        return self.buffer.stats()
