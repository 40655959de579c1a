"""Reward functions: a registry of names plus ``pkg.module:function`` import paths.

A reward function is ``fn(prompt: str, response: str, label: str) -> float``.
"""
from __future__ import annotations

import importlib
from typing import Callable

from miles_ray.errors import UserValueError
from miles_ray.utils.registry import Registry

REWARD_FUNCTIONS = Registry("reward function")


def register_reward(name: str):
    return REWARD_FUNCTIONS.register(name)


def resolve_reward_fn(spec: str) -> Callable:
    """A registered name, or ``pkg.module:function``; errors say what to fix."""
    if ":" not in spec:
        if spec not in REWARD_FUNCTIONS:
            raise UserValueError(
                f"reward.fn='{spec}' is not a registered reward ({sorted(REWARD_FUNCTIONS)}) "
                "and not an import path like 'my_pkg.rewards:score'"
            )
        return REWARD_FUNCTIONS[spec]
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserValueError(f"reward.fn='{spec}': cannot import module '{module_name}': {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserValueError(f"reward.fn='{spec}': module '{module_name}' has no function '{attr}'")
    return fn
