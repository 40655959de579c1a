"""Torch policy trainer: recompute old log-probs, PPO-style loss with optional KL, AdamW steps with
grad clipping over micro-batches, an SFT loss, and weight export for sync.

Loss normalisation uses the token/sequence counts of the whole mini-batch, so the gradient does
not depend on the micro-batch size.
"""
from __future__ import annotations

import copy
import math

import torch

from miles_ray.algorithms import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from miles_ray.algorithms.losses import sft_token_loss
from miles_ray.models import load_model, load_tokenizer
from miles_ray.training.batching import pack, split, token_logprobs


class PolicyTrainer:
    def __init__(self, model_spec: str, train_cfg, algo_cfg, dtype: str = "float32",
                 tiny_cache_dir: str = "runs/_models", temperature: float = 1.0, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg, self.algo, self.temperature = train_cfg, algo_cfg, temperature or 1.0
        self.tokenizer = load_tokenizer(model_spec, tiny_cache_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.model = load_model(model_spec, dtype, tiny_cache_dir)
        self.ref_model = None
        if algo_cfg.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_cfg.lr,
                                           weight_decay=train_cfg.weight_decay)
        self.version = 0  # bumped by every optimizer step round (train_step / sft_step)

    # -- log-probs ------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, samples, model=None) -> list[list[float]]:
        """Per-sample response-token log-probs under ``model`` (the policy by default)."""
        model = model or self.model
        model.eval()
        out = []
        for chunk in split(samples, self.cfg.micro_batch_size):
            batch = pack(chunk, self.pad_id)
            lp = token_logprobs(model, batch, self.temperature)
            for i, s in enumerate(chunk):
                out.append(lp[i][batch.mask[i].bool()].tolist())
        return out

    # -- RL step --------------------------------------------------------------------------------
    def train_step(self, samples) -> dict:
        """One rollout batch: recompute old (and ref) log-probs, then ``num_minibatches`` steps."""
        old = self.compute_logprobs(samples)
        refs = self.compute_logprobs(samples, self.ref_model) if self.ref_model is not None else None
        metrics = {"mismatch_abs": _mean_abs_diff(old, [s.response_logprobs for s in samples])}
        rows = [(s, old[i], refs[i] if refs else None) for i, s in enumerate(samples)]
        n_mb = self.cfg.num_minibatches
        mb_size = math.ceil(len(rows) / n_mb)
        steps = [self._minibatch_step(mb) for mb in split(rows, mb_size)]
        for key in steps[0]:
            metrics[key] = sum(m[key] for m in steps) / len(steps)
        self.version += 1
        return metrics

    def _minibatch_step(self, rows) -> dict:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens = float(sum(len(s.response_ids) for s, _, _ in rows))
        n_seqs = float(len(rows))
        agg = LOSS_AGGREGATIONS.get_fn(self.algo.loss_agg)
        policy_loss = POLICY_LOSSES.get_fn(self.algo.policy_loss)
        totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clipfrac": 0.0}
        for chunk in split(rows, self.cfg.micro_batch_size):
            batch = pack([s for s, _, _ in chunk], self.pad_id)
            old = _scatter([o for _, o, _ in chunk], batch.mask)
            logp = token_logprobs(self.model, batch, self.temperature)
            pg, pg_metrics = policy_loss(logp, old, batch.advantages, batch.mask, eps_clip=self.algo.eps_clip)
            loss = agg(pg, batch.mask, n_tokens, n_seqs)
            totals["pg_loss"] += loss.item()
            totals["clipfrac"] += pg_metrics["clipfrac"] * len(chunk) / n_seqs
            if self.ref_model is not None:
                ref = _scatter([r for _, _, r in chunk], batch.mask)
                kl = agg(KL_ESTIMATORS.get_fn(self.algo.kl_estimator)(logp, ref), batch.mask, n_tokens, n_seqs)
                loss = loss + self.algo.kl_coef * kl
                totals["kl"] += kl.item()
            totals["loss"] += loss.item()
            loss.backward()
        totals.update(self._optimizer_step())
        return totals

    def _optimizer_step(self) -> dict:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)  # never let NaN/inf reach the weights
            return {"grad_norm": float("nan"), "skipped_step": 1.0}
        self.optimizer.step()
        return {"grad_norm": grad_norm.item(), "skipped_step": 0.0}

    # -- SFT ------------------------------------------------------------------------------------
    def sft_step(self, samples, lr: float | None = None) -> dict:
        """One supervised step: token-mean NLL of the response tokens of ``samples``."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens = float(sum(len(s.response_ids) for s in samples))
        total = 0.0
        for chunk in split(samples, self.cfg.micro_batch_size):
            batch = pack(chunk, self.pad_id)
            logp = token_logprobs(self.model, batch, 1.0)
            loss = LOSS_AGGREGATIONS["token_mean"](sft_token_loss(logp), batch.mask, n_tokens, len(samples))
            loss.backward()
            total += loss.item()
        metrics = {"sft_loss": total, **self._optimizer_step()}
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr
        self.version += 1
        return metrics

    # -- weights --------------------------------------------------------------------------------
    def get_weights(self) -> dict:
        """CPU copy of the state dict (what engines load)."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}


def _scatter(per_sample: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(mask)
    for i, values in enumerate(per_sample):
        if values:
            out[i][mask[i].bool()] = torch.tensor(values, dtype=out.dtype)
    return out


def _mean_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    diffs = [abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return sum(diffs) / max(len(diffs), 1)
