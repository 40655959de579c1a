"""BufferActor: holds samples (or prompt groups) between rollout and training."""
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

    def put_group(self, group: list) -> int:
        return self.buffer.put_group(group)

    def get_groups(self, n: int, policy: str = "fifo") -> list:
        return self.buffer.get_groups(n, policy)

    def snapshot(self) -> list:
        return self.buffer.snapshot()

    def clear(self) -> int:
        return self.buffer.clear()

    def size(self) -> int:
        return len(self.buffer)

    def stats(self) -> dict:
        return self.buffer.stats()
