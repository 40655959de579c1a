"""Off-policy correction for async training (decoupled PPO + importance weights).

The PPO ratio is taken against the *proximal* policy (old log-probs recomputed by the trainer at
the current version); the importance weight w = pi_prox / pi_behaviour (behaviour = the engine that
sampled, possibly some versions older) multiplies the loss:
- ``tis``: truncated, min(w, clip);
- ``mis``: masked, tokens (or sequences) with w outside [mask_low, mask_high] get weight 0.
Level ``token`` uses per-token ratios; ``sequence`` uses exp(sum of token log-ratios) per sequence.
"""
from __future__ import annotations

import torch


def importance_weights(prox_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor, cfg):
    """Returns (weights [B, T] detached, metrics). ``cfg`` is an OffPolicyConfig."""
    log_ratio = ((prox_logp - behav_logp) * mask).clamp(-20, 20)
    if cfg.level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).clamp(-20, 20).expand_as(mask)
    w = torch.exp(log_ratio)
    if cfg.mode == "tis":
        out = w.clamp(max=cfg.clip)
    elif cfg.mode == "mis":
        out = torch.where((w >= cfg.mask_low) & (w <= cfg.mask_high), w, torch.zeros_like(w))
    else:
        out = torch.ones_like(w)
    n = mask.sum().clamp(min=1)
    metrics = {
        "is_weight_mean": ((w * mask).sum() / n).item(),
        "is_weight_max": (w * mask).max().item() if mask.any() else 0.0,
        "is_frac_masked": (((out == 0) & (mask > 0)).float().sum() / n).item(),
        "is_frac_truncated": (((w > cfg.clip) & (mask > 0)).float().sum() / n).item() if cfg.mode == "tis" else 0.0,
        # k1 estimate of KL(behaviour || proximal) = E_behaviour[log behav - log prox]
        "kl_behav_prox": (((behav_logp - prox_logp) * mask).sum() / n).item(),
    }
    return (out * mask).detach(), metrics
