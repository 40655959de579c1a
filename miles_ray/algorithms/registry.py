"""Registries that make algorithms pluggable (verl-style ``@REGISTRY.register(name)``).

Each one also takes a ``pkg.module:function`` import path (:mod:`miles_ray.utils.resolve`), checked
against its contract when the config is loaded (below; the advantage estimators' is next to
AdvantageInputs): the signature takes what the trainer passes and one call on a tiny batch (2 samples
x 3 tokens) returns the documented type (docs/customization.md).
"""
from __future__ import annotations

import torch

from miles_ray.utils.registry import Registry
from miles_ray.utils.resolve import Contract


def tiny_batch():
    """(logp, old_logp, advantages, mask) of 2 samples x 3 tokens; the second has 2 response tokens."""
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, logp - 0.1, torch.tensor([[1.0] * 3, [-1.0] * 3]), mask


def is_tensor(x, shape=None) -> bool:
    return isinstance(x, torch.Tensor) and (shape is None or tuple(x.shape) == tuple(shape))


def what(x) -> str:
    return f"a Tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _probe_policy_loss(fn):
    logp, old, adv, mask = tiny_batch()
    out = fn(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, dual_clip=None)
    if not (isinstance(out, tuple) and len(out) == 2 and is_tensor(out[0], logp.shape) and isinstance(out[1], dict)):
        return f"returned {what(out)}, not (per-token loss Tensor [2, 3], metrics dict)"
    if "clipfrac" not in out[1]:
        return "its metrics dict has no 'clipfrac' (a float; 0.0 when nothing is clipped)"
    return None


def _probe_kl(fn):
    logp, old, _, _ = tiny_batch()
    out = fn(logp, old)
    return None if is_tensor(out, logp.shape) else f"returned {what(out)}, not a per-token Tensor [2, 3]"


def _probe_agg(fn):
    logp, _, _, mask = tiny_batch()
    out = fn(logp, mask, 5.0, 2.0)
    return None if is_tensor(out, ()) else f"returned {what(out)}, not a 0-dim (scalar) Tensor"


ADVANTAGE_ESTIMATORS = Registry("advantage estimator", "algorithm.advantage")  # contract: algorithms.advantages
POLICY_LOSSES = Registry("policy loss", "algorithm.policy_loss", Contract(
    "fn(logp, old_logp, advantages, mask, eps_low=, eps_high=, dual_clip=)",
    "(per-token loss [B, T] Tensor, metrics dict with 'clipfrac')",
    args=("logp", "old_logp", "advantages", "mask"), kwargs=("eps_low", "eps_high", "dual_clip"),
    probe=_probe_policy_loss))
LOSS_AGGREGATIONS = Registry("loss aggregation", "algorithm.loss_agg", Contract(
    "fn(loss, mask, n_tokens, n_seqs)", "a 0-dim Tensor", args=("loss", "mask", "n_tokens", "n_seqs"),
    probe=_probe_agg))
KL_ESTIMATORS = Registry("KL estimator", "algorithm.kl_estimator", Contract(
    "fn(logp, ref_logp)", "a per-token [B, T] Tensor", args=("logp", "ref_logp"), probe=_probe_kl))
