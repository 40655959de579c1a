"""Advantage estimators. Each takes per-sample scalar rewards and group ids and returns
per-sample advantages (broadcast over response tokens by the caller).

Edge cases (documented and tested):
- a group of one sample has no baseline to compare with: its advantage is 0;
- a group whose rewards are all equal has std 0: advantages are 0 (never NaN or inf).
"""
from __future__ import annotations

import torch

from miles_ray.algorithms.registry import ADVANTAGE_ESTIMATORS

EPS = 1e-6


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Mean, unbiased std and size of each sample's group, gathered back per sample."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = uniq.numel()
    count = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, torch.ones_like(rewards))
    total = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, rewards)
    mean = total / count
    sq = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, (rewards - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return mean[inverse], std[inverse], count[inverse]


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, normalize_std: bool = True) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean(group)) / (std(group) + eps); Dr.GRPO when ``normalize_std=False``."""
    rewards = rewards.to(torch.float64)
    mean, std, count = _group_stats(rewards, group_ids)
    adv = rewards - mean
    if normalize_std:
        adv = adv / (std + EPS)
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    adv = torch.where(std > 0, adv, torch.zeros_like(adv)) if normalize_std else adv
    return adv.to(torch.float32)


def compute_advantages(name: str, rewards, group_ids, **kwargs) -> torch.Tensor:
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    group_ids = torch.as_tensor(group_ids)
    return ADVANTAGE_ESTIMATORS.get_fn(name)(rewards, group_ids, **kwargs)
