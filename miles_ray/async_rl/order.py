"""Kept groups enter the buffer in the order they were submitted (admission order).

The staleness bound of :class:`miles_ray.async_rl.staleness.StalenessController` only holds per
group if no group overtakes an earlier-admitted one into training: a group admitted with ``v``
steps done is among the first ``(S + v + 1) * B`` groups *admitted*, so it is trained by step
``v + S`` only if groups are buffered in admission order. Generation finishes out of order (an
engine's call takes as long as its slowest sample; on SGLang 0.5.5 a weight sync aborts every
request and the client re-submits each aborted sample's prefix one by one), so a group admitted
after a sync could finish before an older one and take its place in a batch: the older group
then lags ``S + 1`` versions (issue 25 part C: "a sample lags 2 versions > async_rl.staleness=1").

:class:`AdmissionOrder` holds a finished, kept group until every group submitted before it has
been kept or filtered (a filtered group takes no place). With the buffer's ``oldest_version``
choice (earliest deadline first) every group is then trained within the bound: the buffer always
holds a prefix of the admission order, so a group is passed over only for one of an older version.
"""
from __future__ import annotations


class AdmissionOrder:
    def __init__(self):
        self.open: set = set()  # group ids submitted, not yet kept or filtered
        self.held: dict = {}  # group id -> payload: kept, waiting for an earlier group

    def submit(self, group_ids) -> None:
        self.open.update(group_ids)

    def kept(self, group_id, payload) -> list:
        """A scored group that passed the filter: the ``(group id, payload)`` pairs that may enter
        the buffer now, in admission order (maybe none: an earlier group is still running)."""
        self.held[group_id] = payload
        return self._release()

    def filtered(self, group_id) -> list:
        """A filtered group gives up its place: later held groups may follow."""
        self.open.discard(group_id)
        return self._release()

    def _release(self) -> list:
        out = []
        while self.open and min(self.open) in self.held:
            gid = min(self.open)
            self.open.discard(gid)
            out.append((gid, self.held.pop(gid)))
        return out

    def waiting_for(self):
        """The group id that holds the others back (None when nothing is held)."""
        return min(self.open) if self.held else None
