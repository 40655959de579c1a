"""The ledger: the record that proves no prompt group was lost or trained twice.

Two views of one record, both pure:

- Per step (both drivers): :func:`step_entry` is written into every metrics row: the group ids a
  step trained on (sorted), each group's prompt row and its sample count (``metrics.jsonl`` names
  them :data:`GROUPS_KEY`, :data:`PROMPTS_KEY`, :data:`SIZES_KEY`). :func:`check_rows` reads those
  rows back from a finished run (resumed or not) and counts lost and duplicated samples.
- Live (async driver): :class:`GroupLedger` tracks where every submitted group is. Invariant::

      submitted = consumed + filtered + buffered + running      (lost() == 0)

  ``consumed`` is a list so that a group trained twice shows up in :meth:`GroupLedger.duplicates`.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Iterable

from miles_ray.utils.metric_names import group_key

GROUPS_KEY, PROMPTS_KEY, SIZES_KEY = (group_key(k) for k in ("ledger_groups", "ledger_prompts", "ledger_sizes"))


def step_entry(samples: list) -> dict:
    """What a step trained on: group ids (sorted), each group's prompt row and its sample count."""
    groups: dict = {}
    for s in samples:
        groups.setdefault(s.group_id, [s.prompt_index, 0])[1] += 1
    ids = sorted(groups)
    return {"ledger_groups": ids, "ledger_prompts": [groups[g][0] for g in ids],
            "ledger_sizes": [groups[g][1] for g in ids]}


def check_rows(rows: list, n_per_group: int, expected_groups: Iterable[int] | None = None) -> dict:
    """Check metrics rows of one run (as in ``metrics.jsonl``: grouped keys). Returns ``steps``
    (distinct steps), ``groups`` (distinct groups trained), ``duplicates`` (rows of a step seen
    before + samples trained beyond ``n_per_group`` per group: a group in two steps counts) and
    ``lost`` (samples missing from groups trained short, or from ``expected_groups`` that were
    never trained)."""
    per_group: collections.Counter = collections.Counter()
    for r in rows:
        for gid, size in zip(r[GROUPS_KEY], r[SIZES_KEY]):
            per_group[gid] += size
    steps = collections.Counter(r["step"] for r in rows)
    expected = set(per_group) if expected_groups is None else set(expected_groups)
    lost = sum(max(0, n_per_group - per_group[g]) for g in expected | set(per_group))
    dup = sum(max(0, c - n_per_group) for c in per_group.values()) + sum(c - 1 for c in steps.values())
    return {"steps": len(steps), "lost": lost, "duplicates": dup, "groups": len(per_group)}


@dataclass
class GroupLedger:
    """Where every group of an async run went (see the module docstring for the invariant)."""
    submitted: set = field(default_factory=set)
    filtered: set = field(default_factory=set)
    accepted: set = field(default_factory=set)
    consumed: list = field(default_factory=list)

    def lost(self, running: set, buffered: set | None = None) -> int:
        """Groups that are nowhere: not trained on, filtered, buffered (``buffered``: the buffer's
        actual contents; default: accepted and not consumed) or running."""
        consumed = set(self.consumed)
        buffered = self.accepted - consumed if buffered is None else set(buffered)
        return len(self.submitted - consumed - self.filtered - buffered - running)

    def duplicates(self) -> int:
        return len(self.consumed) - len(set(self.consumed))

    def state_dict(self) -> dict:
        return {"submitted": sorted(self.submitted), "filtered": sorted(self.filtered),
                "accepted": sorted(self.accepted), "consumed": list(self.consumed)}

    @classmethod
    def from_state(cls, state: dict) -> "GroupLedger":
        return cls(set(state["submitted"]), set(state["filtered"]), set(state["accepted"]), list(state["consumed"]))

    @classmethod
    def after_sync_steps(cls, groups: int) -> "GroupLedger":
        """The ledger implied by a synchronous checkpoint: groups ``0..groups-1`` all trained."""
        return cls(set(range(groups)), set(), set(range(groups)), list(range(groups)))
