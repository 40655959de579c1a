"""Rewards: registry of reward functions and factories, the rule-based math reward, and a safe runner."""
from miles_ray.rewards.registry import (  # noqa: F401
    REWARD_FACTORIES, REWARD_FUNCTIONS, RewardResult, build_reward_fn, check_reward_spec, register_reward,
    register_reward_factory, resolve_reward_fn,
)
from miles_ray.rewards import math as _math  # noqa: F401  (registers "math")
from miles_ray.rewards import code_exec as _code_exec  # noqa: F401  (registers "code_exec")
from miles_ray.rewards import services as _services  # noqa: F401  (registers "reward_model", "llm_judge")
from miles_ray.rewards.runner import RewardRunner, RewardStats  # noqa: F401
