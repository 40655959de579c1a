"""Sample buffer between rollout and training, by samples (sync driver) or by prompt groups
(async driver). Invariant (tested): ``put_total = taken_total + size`` (counted in samples)."""
from __future__ import annotations

from collections import deque


class SampleBuffer:
    def __init__(self):
        self._queue = deque()  # samples (sync) or lists of samples (groups, async)
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

    def put_group(self, group: list) -> int:
        self._queue.append(list(group))
        self.put_total += len(group)
        return len(self._queue)

    def get_groups(self, n: int, policy: str = "fifo") -> list[list]:
        """Take ``n`` groups: ``fifo`` (arrival order) or ``oldest_version`` (smallest weight
        version first: the staleness-aware choice when engines finish out of order)."""
        if policy == "oldest_version":
            ordered = sorted(self._queue, key=lambda g: min(s.weight_version for s in g))
            self._queue = deque(ordered)
        out = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        self.taken_total += sum(len(g) for g in out)
        return out

    def snapshot(self) -> list:
        """The queued items, oldest first, without taking them (for checkpoints)."""
        return list(self._queue)

    def clear(self) -> int:
        """Drop everything (a restore refills the buffer from a checkpoint); counted as taken."""
        dropped = sum(len(x) if isinstance(x, list) else 1 for x in self._queue)
        self.taken_total += dropped
        self._queue.clear()
        return dropped

    def __len__(self) -> int:
        return len(self._queue)

    def stats(self) -> dict:
        return {"size": len(self._queue), "put_total": self.put_total, "taken_total": self.taken_total}
