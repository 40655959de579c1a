"""Supervised fine-tuning: samples from (prompt, target) pairs (SFT warm-start) and the SFT step
shared by the policy trainer and the draft trainer (:mod:`miles_ray.training.fsdp.draft`)."""
from __future__ import annotations

from miles_ray.algorithms import LOSS_AGGREGATIONS
from miles_ray.algorithms.losses import sft_token_loss
from miles_ray.sample import Sample
from miles_ray.training.base import padded_micro_batches
from miles_ray.training.collectives import all_sum
from miles_ray.training.batching import loss_tokens, pack


def sft_samples(items, tokenizer, target_fn=lambda item: item.label) -> list[Sample]:
    """Samples whose response is ``target_fn(item)`` followed by eos."""
    out = []
    for item in items:
        prompt_ids = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(str(target_fn(item)), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Sample(prompt_index=item.index, group_id=item.index, prompt=item.prompt, label=item.label,
                          prompt_ids=prompt_ids, response_ids=target_ids))
    return out


class SFTMixin:
    """``sft_step`` for a :class:`~miles_ray.training.base.TorchTrainerBase` whose ``model`` is a
    :class:`~miles_ray.training.fsdp.logprobs.CausalLMForTraining` and that has ``pad_id``."""

    def sft_step(self, samples, lr: float | None = None) -> dict:
        """One supervised step: token-mean NLL of the response tokens of this rank's ``samples``
        (normalised by the global token count), at ``lr`` (default: the base learning rate; the
        RL schedule does not advance)."""
        self.set_lr(lr if lr is not None else self.base_lr)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens, n_seqs = all_sum([loss_tokens(samples), float(len(samples))])

        def loss_fn(chunk):
            batch = pack(chunk, self.pad_id, self.device, packed=self.cfg.packing)
            logp, _ = self.model(batch, 1.0, "none")
            nll = sft_token_loss(batch.by_sample(logp))
            loss = LOSS_AGGREGATIONS["token_mean"](nll, batch.sample_mask, n_tokens, n_seqs)
            return loss, {"sft_loss": loss.item()}

        totals = self.backward_micro_batches(padded_micro_batches(samples, self.cfg), loss_fn)
        metrics = {"sft_loss": all_sum([totals.get("sft_loss", 0.0)])[0], **self.optimizer_step(scheduled=False)}
        self.set_lr(self.base_lr)
        self.version += 1
        return metrics
