"""Metric names, grouped by subsystem: ``<group>/<name>``, the same in ``metrics.jsonl``, wandb and
Ray (``ray_miles_<group>_<name>`` on Prometheus).

Groups: ``train/`` (losses, KL, mismatch, what a step trained on), ``rollout/`` (rewards, lengths,
speculation), ``async/`` (staleness, group counts, importance weights), ``eval/`` (held-out
evaluation), ``perf/`` (timings, throughput), ``fault/`` (recoveries, restarts, engine states).

Invariants (tests/unit/ops/test_observability.py):

- :func:`group_key` is the first matching rule of :data:`RULES` (an already grouped key keeps its
  name); a key no rule names is a trainer metric (``train/``). Every grouped key starts with one of
  :data:`GROUPS`, and grouping twice changes nothing.
- The new name is ``group + "/" + old name``: no other renaming.
- List-valued fields (the ledger's group ids, each recovery's seconds) are only in
  ``metrics.jsonl``: :func:`scalars` drops them for wandb and Ray.
"""
from __future__ import annotations

import math
import re

GROUPS = ("train", "rollout", "async", "eval", "perf", "fault")
DEFAULT_GROUP = "train"  # the trainer ranks return an open set of keys (losses, critic, draft, MoE)

# (pattern, group): exact names or prefixes ending in "_"; the first match wins
RULES: tuple[tuple[str, str], ...] = (
    ("eval_", "eval"),
    ("time_", "perf"),
    ("rollout_tokens_per_s", "perf"),
    ("reward_", "rollout"),
    ("rollout_fn_", "rollout"),
    ("agent_", "rollout"),
    ("response_len_", "rollout"),
    ("frac_finished", "rollout"),
    ("num_samples", "rollout"),
    ("spec_", "rollout"),
    ("staleness_", "async"),
    ("groups_", "async"),
    ("is_", "async"),
    ("kl_behav_prox", "async"),
    ("recoveries", "fault"),
    ("recovery_", "fault"),
    ("restarts", "fault"),
    ("engines_", "fault"),
)

_PROM_OK = re.compile(r"[^a-zA-Z0-9_]")


def _matches(key: str, pattern: str) -> bool:
    return key.startswith(pattern) if pattern.endswith("_") else key == pattern


def group_of(key: str) -> str:
    """The group of a key (grouped or not)."""
    if "/" in key:
        return key.split("/", 1)[0]
    return next((g for p, g in RULES if _matches(key, p)), DEFAULT_GROUP)


def group_key(key: str) -> str:
    """``reward_mean`` -> ``rollout/reward_mean``; ``step`` and grouped keys stay as they are."""
    if key == "step" or "/" in key:
        return key
    return f"{group_of(key)}/{key}"


def grouped(metrics: dict) -> dict:
    """A metrics dict with every key grouped (order kept)."""
    return {group_key(k): v for k, v in metrics.items()}


def is_scalar(value) -> bool:
    """A finite number (bools count): what wandb and Ray get."""
    return isinstance(value, (int, float)) and not (isinstance(value, float) and not math.isfinite(value))


def scalars(row: dict) -> dict:
    """The scalar fields of a row (list-valued ledger fields stay out of wandb and Ray)."""
    return {k: v for k, v in row.items() if is_scalar(v)}


def prom_name(key: str) -> str:
    """The ``ray.util.metrics`` name of a grouped key (Prometheus adds ``ray_``):
    ``perf/time_step_s`` -> ``miles_perf_time_step_s``."""
    return "miles_" + _PROM_OK.sub("_", key)
