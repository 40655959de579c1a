"""FIFO sample buffer. Invariant (tested): ``put_total = taken_total + size``."""
from __future__ import annotations

from collections import deque


class SampleBuffer:
    def __init__(self):
        self._queue = deque()
        self.put_total = 0
        self.taken_total = 0

    def put(self, samples: list) -> int:
        self._queue.extend(samples)
        self.put_total += len(samples)
        return len(self._queue)

    def get(self, n: int) -> list:
        """Take up to ``n`` samples, oldest first."""
        out = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        self.taken_total += len(out)
        return out

    def __len__(self) -> int:
        return len(self._queue)

    def stats(self) -> dict:
        return {"size": len(self._queue), "put_total": self.put_total, "taken_total": self.taken_total}
