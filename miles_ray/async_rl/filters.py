"""Dynamic-sampling group filters (``async_rl.filter``): a group is kept when its filter returns True.

A filter is ``fn(samples: list[Sample]) -> bool`` over the samples of one prompt; a
``pkg.module:function`` import path works too (checked on a two-sample group when the config loads).
"""
from __future__ import annotations

from miles_ray.sample import Sample
from miles_ray.utils.registry import Registry
from miles_ray.utils.resolve import Contract


def _probe(fn):
    group = [Sample(0, 0, "p", "l", [1], [2], [-0.5], reward=r) for r in (0.0, 1.0)]
    out = fn(group)
    return None if isinstance(out, bool) else f"returned {type(out).__name__}, not bool"


GROUP_FILTERS = Registry("group filter", "async_rl.filter", Contract(
    "fn(samples: list[Sample])", "bool (True: keep the group)", args=("samples",), probe=_probe))


@GROUP_FILTERS.register("none")
def keep_all(samples: list) -> bool:
    return True


@GROUP_FILTERS.register("nonzero_std")
def nonzero_std(samples: list) -> bool:
    """Drop groups whose rewards are all equal (no learning signal under group baselines)."""
    return len({s.reward for s in samples}) > 1
