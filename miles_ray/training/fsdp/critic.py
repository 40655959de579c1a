"""Critic (value model) rank for PPO with GAE: the policy's backbone with a scalar head per token.

Values are read at the same positions as log-probs (position t scores the state before token t+1),
so ``values[j]`` is the value before response token j.
"""
from __future__ import annotations

import torch

from miles_ray.algorithms.losses import value_loss
from miles_ray.models.loading import load_empty, load_model
from miles_ray.training import precision as prec
from miles_ray.training.base import padded_micro_batches
from miles_ray.training.collectives import all_sum
from miles_ray.training.fsdp.base import FSDPTrainerBase
from miles_ray.training.batching import loss_tokens, pack, unpack
from miles_ray.training.fsdp.logprobs import ValueModelForTraining


SCORE_INIT = {"score.weight": torch.nn.init.zeros_, "score.bias": torch.nn.init.zeros_}  # V = 0 everywhere


def load_value_model(spec: str, dtype: str = "float32", tiny_cache_dir: str = "runs/_models"):
    """The causal LM's backbone with a zero scalar head (a full load, on CPU)."""
    model = load_model(spec, dtype, tiny_cache_dir, head="value")
    torch.nn.init.zeros_(model.score.weight)  # start from V = 0 everywhere (the bias is zero already)
    return model


class CriticTrainer(FSDPTrainerBase):
    def __init__(self, model_spec: str, train_cfg, dtype: str = "float32", tiny_cache_dir: str = "runs/_models",
                 pad_id: int = 0, seed: int = 0, schedule_steps: int = 0):
        torch.manual_seed(seed)
        self.pad_id = pad_id
        precision = prec.resolve(train_cfg.precision, dtype)
        model, weights = load_empty(model_spec, prec.load_dtype(precision), tiny_cache_dir, "value", SCORE_INIT)
        if weights is None:
            torch.nn.init.zeros_(model.score.weight)
        super().__init__(model, train_cfg, train_cfg.critic_lr, train_cfg.strategy, precision,
                         ValueModelForTraining(model), schedule_steps, weights, SCORE_INIT)

    def _pack(self, chunk):
        return pack(chunk, self.pad_id, self.device, packed=self.cfg.packing)

    @torch.no_grad()
    def compute_values(self, samples) -> list:
        """Fill ``values`` on each sample (per response token) and return the samples."""
        self.model.eval()
        found = {}
        for chunk, weight in padded_micro_batches(samples, self.cfg):
            batch = self._pack(chunk)
            with self.autocast():
                values = self.model(batch)
            if weight:
                found.update({id(s): v for s, v in zip(chunk, unpack(values, batch))})
        for s in samples:
            s.values = found[id(s)]
        return samples

    def train_step(self, minibatches: list[list]) -> dict:
        """Clipped value loss (token mean) against ``returns``; one optimizer step per mini-batch."""
        steps = []
        for mb in [mb for _ in range(self.cfg.ppo_epochs) for mb in minibatches]:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            (n_tokens,) = all_sum([loss_tokens(mb)])

            def loss_fn(chunk):
                batch = self._pack(chunk)
                mask = batch.sample_mask
                per_tok = value_loss(batch.by_sample(self.model(batch)), batch.sample_field("values"),
                                     batch.sample_field("returns"), mask, self.cfg.value_clip)
                loss = (per_tok * mask).sum() / max(n_tokens, 1.0)
                return loss, {"value_loss": loss.item()}

            micro = padded_micro_batches(mb, self.cfg)
            totals = self.backward_micro_batches(micro, loss_fn)
            step = {"value_loss": all_sum([totals.get("value_loss", 0.0)])[0]}
            step.update({f"critic_{k}": v for k, v in self.optimizer_step().items()})
            steps.append(step)
        return {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}
