"""The RL loss of one micro-batch, shared by every training backend (FSDP and Megatron): the
policy loss, off-policy importance weights, KL-as-loss and the entropy bonus all come from the
:mod:`miles_ray.algorithms` registries; a backend only supplies per-token log-probs and entropy.

Uses ``self.algo``, ``self.off_policy``, ``self.ref``, ``self.mismatch_max`` and ``compute_logprobs`` of the trainer.
"""
from __future__ import annotations

import torch

from miles_ray.algorithms import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from miles_ray.algorithms.off_policy import importance_weights

SUMMED_METRICS = ("loss", "pg_loss", "kl", "entropy", "clipfrac", "is_weight_mean", "is_frac_masked",
                  "is_frac_truncated", "kl_behav_prox", "mismatch_abs", "mismatch_k3")


class PolicyLossMixin:
    def prepare(self, samples, old: bool = True) -> list:
        """Fill ``old_logprobs`` (unless ``old=False``: see ``train_step``) and ``ref_logprobs``
        when a reference model is used, with the backend's ``compute_logprobs``."""
        if old:
            for s, lp in zip(samples, self.compute_logprobs(samples)):
                s.old_logprobs = lp
        if self.ref is not None:
            for s, lp in zip(samples, self.compute_logprobs(samples, self.ref)):
                s.ref_logprobs = lp
        return samples

    def train_step(self, minibatches: list[list]) -> dict:
        """``train.ppo_epochs`` passes, one optimizer step per mini-batch (this rank's part of each
        global mini-batch; the backend's ``minibatch_step``). Samples carry per-token advantages and
        old log-probs; without old log-probs and with one optimizer step in all, the training
        forward's own log-probs are the old ones (exactly on-policy: ratio 1, no second forward
        pass), else they are computed."""
        single = len(minibatches) == 1 and self.cfg.ppo_epochs == 1
        for mb in [] if single else minibatches:
            missing = [s for s in mb if s.old_logprobs is None]
            for s, lp in zip(missing, self.compute_logprobs(missing) if missing else []):
                s.old_logprobs = lp
        steps = [self.minibatch_step(mb) for _ in range(self.cfg.ppo_epochs) for mb in minibatches]
        metrics = {k: sum(m[k] for m in steps) / len(steps) for k in steps[0]}
        self.version += 1
        return metrics

    def policy_loss(self, batch, logp_tok: torch.Tensor, ent_tok: torch.Tensor | None, n_tokens: float,
                    n_seqs: float):
        """(loss, metrics) of one micro-batch from its per-token log-probs / entropy ``[R, L]``."""
        a = self.algo
        agg = LOSS_AGGREGATIONS.get_fn(a.loss_agg)
        logp, mask = batch.by_sample(logp_tok), batch.sample_mask
        old = batch.sample_field("old_logprobs") if "old_logprobs" in batch.fields else logp.detach() * mask
        pg, m = POLICY_LOSSES.get_fn(a.policy_loss)(logp, old, batch.sample_field("advantages"), mask,
                                                    eps_low=a.eps_low, eps_high=a.eps_high, dual_clip=a.dual_clip)
        frac = mask.sum().item() / max(n_tokens, 1.0)
        metrics = {"clipfrac": m["clipfrac"] * frac}
        if self.off_policy is not None:  # decoupled PPO: weight by pi_prox / pi_behaviour
            w, m_is = importance_weights(old, batch.sample_field("response_logprobs"), mask, self.off_policy)
            pg = pg * w
            metrics.update({k: v * frac for k, v in m_is.items() if k in SUMMED_METRICS})
        loss = agg(pg, mask, n_tokens, n_seqs)
        ent = agg(batch.by_sample(ent_tok), mask, n_tokens, n_seqs)
        sums = _mismatch_sums(old, batch, mask)
        self.mismatch_max = max(self.mismatch_max, sums.pop("mismatch_max", 0.0))
        metrics.update(pg_loss=loss.item(), entropy=ent.item(), **sums)
        if self.ref is not None and a.kl_mode == "loss":
            kl = agg(KL_ESTIMATORS.get_fn(a.kl_estimator)(logp, batch.sample_field("ref_logprobs")), mask,
                     n_tokens, n_seqs)
            loss = loss + a.kl_coef * kl
            metrics["kl"] = kl.item()
        if a.entropy_coef:
            loss = loss - a.entropy_coef * ent
        metrics["loss"] = loss.item()
        return loss, metrics


def _mismatch_sums(old, batch, mask) -> dict:
    """Rollout/trainer drift summed over this micro-batch's tokens: |old - behaviour| and the k3
    estimate of KL(rollout || trainer), ``r - 1 - log r`` with ``r = pi_trainer / pi_rollout``."""
    if "response_logprobs" not in batch.fields:
        return {}
    delta = ((old - batch.sample_field("response_logprobs")) * mask).double().clamp(-20, 20)
    return {"mismatch_abs": (delta.abs() * mask).sum().item(),
            "mismatch_k3": ((delta.exp() - 1 - delta) * mask).sum().item(),
            "mismatch_max": (delta.abs() * mask).max().item() if mask.numel() else 0.0}
