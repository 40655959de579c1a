"""Policy trainer rank: recompute old (and reference) log-probs, policy loss from the registry with
optional KL-as-loss and entropy bonus, AdamW over micro-batches, an SFT loss, weight export.

Loss normalisation uses the token/sequence counts of the whole global mini-batch (summed over
ranks), so gradients depend neither on the micro-batch size nor on the number of ranks.
"""
from __future__ import annotations

import copy

import torch

from miles_ray.algorithms import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from miles_ray.algorithms.off_policy import importance_weights
from miles_ray.models import load_model, load_tokenizer
from miles_ray.training.base import TorchTrainerBase, all_sum, padded_micro_batches
from miles_ray.training.batching import make_minibatches, pack, token_logprobs, unpack
from miles_ray.training.sft import SFTMixin

SUMMED_METRICS = ("loss", "pg_loss", "kl", "entropy", "clipfrac", "is_weight_mean", "is_frac_masked",
                  "is_frac_truncated", "kl_behav_prox")


class PolicyTrainer(SFTMixin, TorchTrainerBase):
    def __init__(self, model_spec: str, train_cfg, algo_cfg, dtype: str = "float32",
                 tiny_cache_dir: str = "runs/_models", temperature: float = 1.0, seed: int = 0, off_policy=None):
        torch.manual_seed(seed)
        self.algo, self.temperature = algo_cfg, temperature or 1.0
        self.off_policy = off_policy if off_policy is not None and off_policy.mode != "none" else None
        self.tokenizer = load_tokenizer(model_spec, tiny_cache_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        model = load_model(model_spec, dtype, tiny_cache_dir)
        self.ref_model = None
        if algo_cfg.kl_coef > 0:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            if torch.cuda.is_available():
                self.ref_model.cuda()
        super().__init__(model, train_cfg, train_cfg.lr, getattr(train_cfg, "strategy", "ddp"))
        self.version = 0  # optimizer-step rounds done (train_step / sft_step)

    # -- log-probs ------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, samples, model=None) -> list[list[float]]:
        """Per-sample response-token log-probs under ``model`` (the policy by default)."""
        model = model or self.model
        model.eval()
        out = []
        for chunk, weight in padded_micro_batches(samples, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch):
            if not chunk:
                continue
            batch = pack(chunk, self.pad_id, self.device)
            lps = unpack(token_logprobs(model, batch, self.temperature), batch)
            out.extend(lps if weight else [])
        return out

    def prepare(self, samples) -> list:
        """Fill ``old_logprobs`` (and ``ref_logprobs`` when a reference model is used)."""
        for s, lp in zip(samples, self.compute_logprobs(samples)):
            s.old_logprobs = lp
        if self.ref_model is not None:
            for s, lp in zip(samples, self.compute_logprobs(samples, self.ref_model)):
                s.ref_logprobs = lp
        return samples

    # -- RL step --------------------------------------------------------------------------------
    def train_step(self, minibatches: list[list]) -> dict:
        """One optimizer step per mini-batch (this rank's part of each global mini-batch).
        Samples must be prepared (old log-probs) and carry per-token ``advantages``."""
        for mb in minibatches:
            for s in mb:
                if s.old_logprobs is None:
                    s.old_logprobs = self.compute_logprobs([s])[0]
        steps = [self._minibatch_step(mb) for mb in minibatches]
        metrics = {k: sum(m[k] for m in steps) / len(steps) for k in steps[0]}
        metrics["mismatch_abs"] = _mismatch([s for mb in minibatches for s in mb])
        self.version += 1
        return metrics

    def _minibatch_step(self, samples) -> dict:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens, n_seqs = all_sum([float(sum(len(s.response_ids) for s in samples)), float(len(samples))])
        agg = LOSS_AGGREGATIONS.get_fn(self.algo.loss_agg)
        policy_loss = POLICY_LOSSES.get_fn(self.algo.policy_loss)
        use_ref = self.ref_model is not None and self.algo.kl_mode == "loss"

        def loss_fn(chunk):
            batch = pack(chunk, self.pad_id, self.device)
            logp, entropy = token_logprobs(self.model, batch, self.temperature, with_entropy=True)
            pg, m = policy_loss(logp, batch.old_logprobs, batch.advantages, batch.mask, eps_low=self.algo.eps_low,
                                eps_high=self.algo.eps_high, dual_clip=self.algo.dual_clip)
            frac = batch.mask.sum().item() / max(n_tokens, 1.0)
            is_metrics = {}
            if self.off_policy is not None:  # decoupled PPO: weight by pi_prox / pi_behaviour
                w, m_is = importance_weights(batch.old_logprobs, batch.response_logprobs, batch.mask, self.off_policy)
                pg = pg * w
                is_metrics = {k: v * frac for k, v in m_is.items() if k in SUMMED_METRICS}
            loss = agg(pg, batch.mask, n_tokens, n_seqs)
            ent = agg(entropy.detach() if not self.algo.entropy_coef else entropy, batch.mask, n_tokens, n_seqs)
            metrics = {"pg_loss": loss.item(), "entropy": ent.item(), "clipfrac": m["clipfrac"] * frac, **is_metrics}
            if use_ref:
                kl = agg(KL_ESTIMATORS.get_fn(self.algo.kl_estimator)(logp, batch.ref_logprobs), batch.mask,
                         n_tokens, n_seqs)
                loss = loss + self.algo.kl_coef * kl
                metrics["kl"] = kl.item()
            if self.algo.entropy_coef:
                loss = loss - self.algo.entropy_coef * ent
            metrics["loss"] = loss.item()
            return loss, metrics

        micro = padded_micro_batches(samples, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch)
        totals = self.backward_micro_batches(micro, loss_fn)
        keys = [k for k in SUMMED_METRICS if self.off_policy is not None or not k.startswith(("is_", "kl_behav"))]
        summed = all_sum([totals.get(k, 0.0) for k in keys])
        out = dict(zip(keys, summed))
        out.update(self.optimizer_step())
        return out

    # -- weights --------------------------------------------------------------------------------
    def get_weights(self) -> dict | None:
        """A CPU copy of the full state dict on rank 0; None on other ranks."""
        state = self.full_state_dict()
        return {k: v.clone() for k, v in state.items()} if state is not None else None


def train_on_samples(trainer: PolicyTrainer, samples: list, num_minibatches: int) -> dict:
    """Single-process convenience: prepare and train on a whole rollout batch."""
    trainer.prepare(samples)
    return trainer.train_step(make_minibatches(samples, num_minibatches))


def _mismatch(samples) -> float:
    """Mean |behaviour - recomputed old| log-prob over response tokens (rollout/trainer drift)."""
    diffs = [abs(x - y) for s in samples if s.old_logprobs and s.response_logprobs
             for x, y in zip(s.old_logprobs, s.response_logprobs)]
    return sum(diffs) / max(len(diffs), 1)
