"""Rewards: registry of reward functions, the rule-based math reward, and a safe runner."""
from miles_ray.rewards.registry import REWARD_FUNCTIONS, register_reward, resolve_reward_fn  # noqa: F401
from miles_ray.rewards import math as _math  # noqa: F401  (registers "math")
from miles_ray.rewards.runner import RewardRunner, RewardStats  # noqa: F401
