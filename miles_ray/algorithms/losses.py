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
def _clip_metrics(ratio, clipped_mask, mask) -> dict:
    n = mask.sum().clamp(min=1.0)
    return {"clipfrac": ((clipped_mask.float() * mask).sum() / n).item(),
            "ratio_mean": ((ratio.detach() * mask).sum() / n).item()}


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(logp, old_logp, advantages, mask, eps_low: float = 0.2, eps_high: float = 0.2,
                  dual_clip: float | None = None, **_):
    """PPO-clip per token with asymmetric clip: max(-A r, -A clip(r, 1-eps_low, 1+eps_high)),
    r = exp(logp - old_logp). Dual-clip (c > 1): for A < 0 the loss is capped at -c A.

    Returns (per-token loss, metrics of detached scalars over masked tokens).
    """
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    metrics = _clip_metrics(ratio, clipped > unclipped, mask)
    if dual_clip is not None:
        capped = torch.minimum(loss, -dual_clip * advantages)
        loss = torch.where(advantages < 0, capped, loss)
        metrics["dual_clipfrac"] = (((loss < torch.maximum(unclipped, clipped)) & (advantages < 0)).float()
                                    * mask).sum().item() / max(mask.sum().item(), 1.0)
    return loss, metrics


@POLICY_LOSSES.register("gspo")
def gspo_loss(logp, old_logp, advantages, mask, eps_low: float = 3e-4, eps_high: float = 4e-4, **_):
    """GSPO: sequence-level ratio s = exp(mean_t(logp - old_logp)) used on every token, in the token
    form s_t = sg(s) * exp(logp_t - sg(logp_t)) so each token gets the gradient of its own log-prob.
    Loss per token: max(-A s_t, -A clip(s_t, 1-eps_low, 1+eps_high))."""
    n_tok = mask.sum(-1).clamp(min=1.0)
    seq_log_ratio = (((logp - old_logp) * mask).sum(-1) / n_tok).clamp(-20.0, 20.0)
    seq_ratio = torch.exp(seq_log_ratio).detach().unsqueeze(-1)
    ratio = seq_ratio * torch.exp(logp - logp.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), _clip_metrics(ratio, clipped > unclipped, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of softmax(logits)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def value_loss(values, old_values, returns, mask, clip: float | None = 0.2):
    """Clipped value loss per token: 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2)."""
    loss = (values - returns) ** 2
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (v_clipped - returns) ** 2)
    return 0.5 * loss


def sft_token_loss(logp: torch.Tensor) -> torch.Tensor:
    """Supervised loss per token: negative log-likelihood of the target tokens."""
    return -logp
