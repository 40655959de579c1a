"""Apply an advantage estimator to a list of Samples (writes per-token ``advantages``/``returns``)."""
from __future__ import annotations

import torch

from miles_ray.algorithms.advantages import AdvantageInputs, compute_advantages
from miles_ray.algorithms.registry import KL_ESTIMATORS


def _response_tensor(samples, attr: str, width: int) -> torch.Tensor:
    out = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        values = getattr(s, attr)
        if values:
            out[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


def assign_advantages(samples: list, algo) -> dict:
    """Compute advantages for ``samples`` with the estimator named by ``algo`` (an AlgorithmConfig).

    KL as a reward penalty (``algo.kl_mode == "reward"``) uses ``old_logprobs`` and ``ref_logprobs``;
    GAE uses ``values``. Returns summary metrics.
    """
    width = max(1, max(len(s.response_ids) for s in samples))
    mask = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        mask[i, : len(s.response_ids)] = 1.0 if s.loss_mask is None else torch.tensor(s.loss_mask, dtype=torch.float32)
    kl = None
    if algo.kl_mode == "reward" and algo.kl_coef > 0:
        if any(s.ref_logprobs is None or s.old_logprobs is None for s in samples):
            raise ValueError("algorithm.kl_mode='reward' needs old and reference log-probs on every sample")
        kl = KL_ESTIMATORS.get_fn(algo.kl_estimator)(_response_tensor(samples, "old_logprobs", width),
                                                     _response_tensor(samples, "ref_logprobs", width)) * mask
    values = _response_tensor(samples, "values", width) if algo.advantage == "gae" else None
    inputs = AdvantageInputs(
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
        group_ids=torch.tensor([s.group_id for s in samples]), mask=mask, kl=kl,
        kl_coef=algo.kl_coef if kl is not None else 0.0, values=values, gamma=algo.gamma, lam=algo.lam,
        normalize_std=algo.normalize_std,
    )
    adv, returns = compute_advantages(algo.advantage, inputs)
    assert torch.isfinite(adv).all(), "advantage estimator produced NaN/inf"
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        s.advantages = (adv[i, :n] * mask[i, :n]).tolist()
        s.returns = returns[i, :n].tolist() if returns is not None else None
    n_tok = mask.sum().clamp(min=1)
    metrics = {"advantage_mean": ((adv * mask).sum() / n_tok).item(),
               "advantage_abs_mean": ((adv.abs() * mask).sum() / n_tok).item()}
    if kl is not None:
        metrics["kl_reward_penalty"] = (kl.sum(-1).mean() * algo.kl_coef).item()
    return metrics
