"""Online draft-model trainer for speculative rollout.

The draft learns from each step's rollouts: hard-label cross-entropy on the response tokens the
policy sampled (the SFT loss of :class:`~miles_ray.training.sft.SFTMixin`). Those tokens are draws
from the policy, so the expected loss is the forward KL from the policy to the draft plus a
constant: minimising it raises the acceptance rate ``sum_x min(p(x), q(x))``. Soft targets (the
policy's whole distribution at every token) would cost ``V`` floats per token to ship from the
trainer; hard labels need nothing beyond the samples the driver already has.
"""
from __future__ import annotations

import torch

from miles_ray.models import load_tokenizer
from miles_ray.models.draft import build_draft
from miles_ray.training.fsdp.base import FSDPTrainerBase
from miles_ray.training.fsdp.logprobs import CausalLMForTraining
from miles_ray.training.sft import SFTMixin


class DraftTrainer(SFTMixin, FSDPTrainerBase):
    def __init__(self, draft_spec: str, target_spec: str, train_cfg, lr: float, dtype: str = "float32",
                 tiny_cache_dir: str = "runs/_models", seed: int = 0):
        torch.manual_seed(seed)
        self.pad_id = load_tokenizer(target_spec, tiny_cache_dir).pad_token_id or 0
        self.base_lr = lr
        model = build_draft(draft_spec, target_spec, dtype, tiny_cache_dir)
        super().__init__(model, train_cfg, lr, "ddp", "fp32", CausalLMForTraining(model, train_cfg.logprob_chunk_tokens))
        self.version = 0  # draft optimizer steps taken

    def train_on(self, samples: list, epochs: int = 1) -> dict:
        """``epochs`` passes over the non-empty responses in ``samples``; returns the loss of the
        first pass (before this step's updates have seen the data) and of the last."""
        samples = [s for s in samples if s.response_ids]
        if not samples:
            return {}
        losses = [self.sft_step(samples)["sft_loss"] for _ in range(max(1, epochs))]
        return {"draft_loss": losses[0], "draft_loss_last": losses[-1], "draft_version": self.version}

    def get_weights(self) -> dict:
        return {k: v.clone() for k, v in self.full_state_dict().items()}
