"""Admission control that bounds how stale a trained-on sample can be (AReaL-style).

Units are prompt groups. With staleness S, batch B and current policy version v (optimizer steps
done), the rollout side may have at most ``(S + v + 1) * B`` groups accepted-or-running:

    accepted + running <= (S + v + 1) * B          (checked on every submit)

so a group submitted at version v is trained on at version <= v + S. A filtered group gives its
slot back. Counters always satisfy ``submitted = accepted + filtered + running``.
S = 0 is the synchronous algorithm: the next batch starts only after the previous one is trained.
"""
from __future__ import annotations


class StalenessController:
    def __init__(self, staleness: int, batch_groups: int, extra_groups: int = 0):
        self.staleness, self.batch, self.extra = staleness, batch_groups, extra_groups
        self.submitted = self.accepted = self.filtered = self.running = 0

    def capacity(self, version: int) -> int:
        """Groups that may be submitted now at policy ``version``."""
        limit = (self.staleness + version + 1) * self.batch + self.extra
        return max(0, limit - (self.accepted + self.running))

    def submit(self, n: int, version: int) -> None:
        if n > self.capacity(version):
            raise RuntimeError(f"staleness bound exceeded: submitting {n} with capacity {self.capacity(version)}")
        self.submitted += n
        self.running += n
        self.check()

    def accept(self, n: int = 1) -> None:
        self.running -= n
        self.accepted += n
        self.check()

    def filter(self, n: int = 1) -> None:
        self.running -= n
        self.filtered += n
        self.check()

    def check(self) -> None:
        assert self.running >= 0, "more groups finished than were running"
        assert self.submitted == self.accepted + self.filtered + self.running, self.state()

    def load_state(self, state: dict) -> None:
        self.submitted, self.accepted = state["submitted"], state["accepted"]
        self.filtered, self.running = state["filtered"], state["running"]
        self.check()

    def state(self) -> dict:
        return {"submitted": self.submitted, "accepted": self.accepted, "filtered": self.filtered,
                "running": self.running}
