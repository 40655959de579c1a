"""Policy losses, KL estimators and loss aggregation. Pure tensor functions.

Shapes: per-token tensors are ``[batch, T]`` with a 0/1 float ``mask`` of response tokens.
Aggregations take the *global* token and sequence counts of the whole mini-batch so that
splitting it into micro-batches does not change the loss (the micro-batch losses add up).
"""
from __future__ import annotations

import torch

from miles_ray.algorithms.registry import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES


# ---- KL estimators: KL(pi || ref) per token, from log-probs of the sampled tokens -------------
@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(log_ratio) - log_ratio - 1.0


# ---- aggregations -----------------------------------------------------------------------------
@LOSS_AGGREGATIONS.register("token_mean")
def agg_token_mean(loss: torch.Tensor, mask: torch.Tensor, n_tokens: float, n_seqs: float) -> torch.Tensor:
    """sum of token losses / tokens in the mini-batch."""
    return (loss * mask).sum() / max(n_tokens, 1.0)


@LOSS_AGGREGATIONS.register("seq_mean_token_sum")
def agg_seq_mean_token_sum(loss, mask, n_tokens, n_seqs):
    """mean over sequences of the per-sequence token sum."""
    return (loss * mask).sum() / max(n_seqs, 1.0)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def agg_seq_mean_token_mean(loss, mask, n_tokens, n_seqs):
    """mean over sequences of the per-sequence token mean (empty sequences count 0)."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_seq.sum() / max(n_seqs, 1.0)


# ---- policy losses ----------------------------------------------------------------------------
@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(logp, old_logp, advantages, mask, eps_clip: float = 0.2, **_):
    """PPO-clip per token: max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - old_logp).

    Returns (per-token loss, metrics dict of detached scalars over masked tokens).
    """
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip)
    loss = torch.maximum(unclipped, clipped)
    n = mask.sum().clamp(min=1.0)
    metrics = {
        "clipfrac": (((clipped > unclipped).float() * mask).sum() / n).item(),
        "ratio_mean": ((ratio * mask).sum() / n).item(),
    }
    return loss, metrics


def sft_token_loss(logp: torch.Tensor) -> torch.Tensor:
    """Supervised loss per token: negative log-likelihood of the target tokens."""
    return -logp
