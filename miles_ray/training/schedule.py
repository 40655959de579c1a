"""Learning-rate schedules (``train.lr_schedule``): a registry of small functions of the optimizer
step, each a factor on ``train.lr``; linear warm-up over ``train.warmup_steps`` first.

A schedule is ``fn(progress: float, min_ratio: float) -> float`` (progress 0..1 over the decay); a
``pkg.module:function`` import path works too (checked at progress 0.5 when the config is checked).
"""
from __future__ import annotations

import math

from miles_ray.utils.registry import Registry
from miles_ray.utils.resolve import Contract


def _probe(fn):
    out = fn(0.5, 0.1)
    ok = isinstance(out, (int, float)) and not isinstance(out, bool)
    return None if ok else f"returned {type(out).__name__}, not float"


LR_SCHEDULES = Registry("learning-rate schedule", "train.lr_schedule", Contract(
    "fn(progress: float, min_ratio: float)", "float (factor on train.lr)", args=("progress", "min_ratio"),
    probe=_probe))


@LR_SCHEDULES.register("constant")
def constant(progress: float, min_ratio: float) -> float:
    return 1.0


@LR_SCHEDULES.register("linear")
def linear(progress: float, min_ratio: float) -> float:
    return 1.0 - (1.0 - min_ratio) * progress


@LR_SCHEDULES.register("cosine")
def cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(name: str, step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Factor on the base learning rate at optimizer ``step`` (0-based) of ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay))
    return LR_SCHEDULES.get_fn(name)(progress, min_ratio)
