"""Advantage estimators (registry ``ADVANTAGE_ESTIMATORS``).

Every estimator takes an :class:`AdvantageInputs` and returns ``(advantages, returns)``, both
``[N, T]`` over response tokens (zero outside ``mask``); ``returns`` is None unless a critic needs it.

Edge cases (documented and tested; no NaN or inf ever comes out):
- a group of one sample has no baseline: GRPO/RLOO give it advantage 0;
- a group whose rewards are all equal: GRPO and RLOO give 0 to all its samples;
- a fully masked sequence (no response token) gets all-zero advantages;
- batch whitening with zero variance only centres (no division by 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from miles_ray.algorithms.registry import ADVANTAGE_ESTIMATORS, is_tensor, tiny_batch, what
from miles_ray.utils.resolve import Contract

EPS = 1e-6


@dataclass
class AdvantageInputs:
    rewards: torch.Tensor  # [N] outcome reward per sample
    group_ids: torch.Tensor  # [N] samples of one prompt share an id
    mask: torch.Tensor  # [N, T] 1 on response tokens
    kl: Optional[torch.Tensor] = None  # [N, T] per-token KL(pi_old || ref), used when kl_coef > 0
    kl_coef: float = 0.0  # KL as a reward penalty (0: off)
    values: Optional[torch.Tensor] = None  # [N, T] critic values (GAE)
    gamma: float = 1.0
    lam: float = 1.0
    normalize_std: bool = True


def _probe(fn):
    """One call on a group of two samples x 3 tokens: ``(advantages, returns or None)`` of that shape."""
    _, _, _, mask = tiny_batch()
    out = fn(AdvantageInputs(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), mask))
    if not (isinstance(out, tuple) and len(out) == 2 and is_tensor(out[0], mask.shape)
            and (out[1] is None or is_tensor(out[1], mask.shape))):
        return f"returned {what(out)}, not (advantages Tensor [2, 3], returns Tensor [2, 3] or None)"
    return None


ADVANTAGE_ESTIMATORS.contract = Contract("fn(inputs: AdvantageInputs)", "(advantages [N, T] Tensor, returns "
                                         "[N, T] Tensor or None)", args=("inputs",), probe=_probe)


def _group_stats(x: torch.Tensor, group_ids: torch.Tensor):
    """Per-sample group mean, unbiased std and group size."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max().item()) + 1 if inverse.numel() else 0
    count = torch.zeros(n, dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    mean = torch.zeros(n, dtype=x.dtype).index_add_(0, inverse, x) / count
    sq = torch.zeros(n, dtype=x.dtype).index_add_(0, inverse, (x - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return mean[inverse], std[inverse], count[inverse]


def _kl_penalty(inp: AdvantageInputs) -> torch.Tensor:
    if inp.kl_coef and inp.kl is not None:
        return -inp.kl_coef * inp.kl * inp.mask
    return torch.zeros_like(inp.mask)


def _scalar_rewards(inp: AdvantageInputs) -> torch.Tensor:
    """Outcome reward plus the summed KL penalty (for sequence-level estimators)."""
    return inp.rewards.double() + _kl_penalty(inp).sum(-1).double()


def token_rewards(inp: AdvantageInputs, outcome: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token rewards: KL penalty on every token, outcome reward on the last response token."""
    out = _kl_penalty(inp).double()
    if inp.mask.shape[1] == 0:
        return out
    outcome = inp.rewards.double() if outcome is None else outcome.double()
    lengths = inp.mask.sum(-1).long()
    last = (inp.mask * torch.arange(inp.mask.shape[1])).argmax(-1)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    out[rows, last[rows]] += outcome[rows]
    return out


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over response tokens (right to left)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running * mask[:, t]
        out[:, t] = running * mask[:, t]
    return out


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over masked tokens of the whole batch; std 0 only centres."""
    n = mask.sum()
    if n < 1:
        return torch.zeros_like(x)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    std = var.sqrt()
    scale = 1.0 / (std + EPS) if std > 0 else 1.0
    return (x - mean) * scale * mask


def _broadcast(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_sample.to(torch.float32).unsqueeze(-1) * mask).to(torch.float32)


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo(inp: AdvantageInputs):
    """A_i = (r_i - mean_group) / (std_group + eps); Dr.GRPO (no std division) when normalize_std=False."""
    r = _scalar_rewards(inp)
    mean, std, count = _group_stats(r, inp.group_ids)
    adv = r - mean
    if inp.normalize_std:
        adv = torch.where(std > 0, adv / (std + EPS), torch.zeros_like(adv))
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    return _broadcast(adv, inp.mask), None


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo(inp: AdvantageInputs):
    """Leave-one-out baseline: A_i = r_i - mean_{j != i} r_j (0 for single-sample groups)."""
    r = _scalar_rewards(inp)
    mean, _, count = _group_stats(r, inp.group_ids)
    loo = (mean * count - r) / (count - 1).clamp(min=1)
    adv = torch.where(count > 1, r - loo, torch.zeros_like(r))
    return _broadcast(adv, inp.mask), None


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp(inp: AdvantageInputs):
    """REINFORCE++: per-token rewards (KL penalty + outcome), discounted return, batch whitening."""
    returns = discounted_returns(token_rewards(inp), inp.mask.double(), inp.gamma)
    return whiten(returns, inp.mask.double()).to(torch.float32), None


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")
def reinforce_pp_baseline(inp: AdvantageInputs):
    """REINFORCE++-baseline: outcome minus its group mean, then as REINFORCE++."""
    r = inp.rewards.double()
    mean, _, _ = _group_stats(r, inp.group_ids)
    returns = discounted_returns(token_rewards(inp, r - mean), inp.mask.double(), inp.gamma)
    return whiten(returns, inp.mask.double()).to(torch.float32), None


@ADVANTAGE_ESTIMATORS.register("gae")
def gae(inp: AdvantageInputs):
    """PPO's GAE with a critic: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}.

    Returns whitened advantages and the (unwhitened) returns A + V for the value loss.
    """
    if inp.values is None:
        raise ValueError("algorithm.advantage='gae' needs critic values (a critic group is started for it)")
    mask, values = inp.mask.double(), inp.values.double() * inp.mask.double()
    rewards = token_rewards(inp)
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + inp.gamma * next_value - values[:, t]
        running = (delta + inp.gamma * inp.lam * running) * mask[:, t]
        adv[:, t] = running
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
    returns = (adv + values) * mask
    return whiten(adv, mask).to(torch.float32), returns.to(torch.float32)


def compute_advantages(name: str, inputs: AdvantageInputs):
    """Look up ``name`` in the registry and run it. Returns (advantages [N,T], returns or None)."""
    return ADVANTAGE_ESTIMATORS.get_fn(name)(inputs)


def scalar_advantages(name: str, rewards, group_ids, normalize_std: bool = True) -> torch.Tensor:
    """Per-sample advantages of an outcome-level estimator (grpo, rloo) without token data."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    inp = AdvantageInputs(r, torch.as_tensor(group_ids), torch.ones(len(r), 1), normalize_std=normalize_std)
    return compute_advantages(name, inp)[0][:, 0]
