"""Reward functions: a registry of names plus ``pkg.module:function`` import paths.

A reward function is ``fn(prompt: str, response: str, label: str) -> float | RewardResult``.
A *factory* (``register_reward_factory``) builds one from the run's reward options
(``cfg.reward`` as a dict, plus the URLs of the run's services): the code sandbox, reward-model and
LLM-judge rewards need their limits and endpoints. A function with ``batched = True`` takes the
whole list of ``(prompt, response, label)`` items at once and returns one result per item (service
clients that keep many requests in flight); it runs in the worker's process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from miles_ray.utils.registry import Registry
from miles_ray.utils.resolve import Contract

REWARD_FUNCTIONS = Registry("reward", "reward.fn", Contract(
    "fn(prompt: str, response: str, label: str)", "float or RewardResult", args=("prompt", "response", "label"),
    batched=Contract("fn(items: list[tuple[prompt, response, label]])", "a list of float or RewardResult, one per item",
                     args=("items",))))
REWARD_FACTORIES = Registry("reward factory")


@dataclass
class RewardResult:
    """A score and, for a failure, its reason (counted per reason in the step's metrics)."""
    score: float
    reason: Optional[str] = None


def register_reward(name: str):
    return REWARD_FUNCTIONS.register(name)


def register_reward_factory(name: str):
    """``factory(options: dict) -> reward function`` registered under ``name``."""
    return REWARD_FACTORIES.register(name)


def known_rewards() -> list[str]:
    return sorted(set(REWARD_FUNCTIONS) | set(REWARD_FACTORIES))


def check_reward_spec(spec: str, field: str = "reward.fn") -> None:
    """Fail at start on a reward name or import path that cannot be used."""
    if spec not in REWARD_FACTORIES:
        resolve_reward_fn(spec, field)


def build_reward_fn(spec: str, options: dict | None = None) -> Callable:
    """The reward function of ``spec``: a factory built with ``options``, else :func:`resolve_reward_fn`."""
    if spec in REWARD_FACTORIES:
        return REWARD_FACTORIES[spec](dict(options or {}))
    return resolve_reward_fn(spec)


def resolve_reward_fn(spec: str, field: str = "reward.fn") -> Callable:
    """A registered name, or ``pkg.module:function`` (checked against the reward contract); errors say
    what to fix (:func:`miles_ray.utils.resolve.resolve`)."""
    return REWARD_FUNCTIONS.get_fn(spec, field, choices=known_rewards())
