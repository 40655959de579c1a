"""Dynamic-sampling group filters: a group is kept when its filter returns True."""
from __future__ import annotations

from miles_ray.utils.registry import Registry

GROUP_FILTERS = Registry("group filter")


@GROUP_FILTERS.register("none")
def keep_all(samples: list) -> bool:
    return True


@GROUP_FILTERS.register("nonzero_std")
def nonzero_std(samples: list) -> bool:
    """Drop groups whose rewards are all equal (no learning signal under group baselines)."""
    return len({s.reward for s in samples}) > 1
