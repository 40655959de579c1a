"""Run micro-batches through megatron's own pipeline schedules (``get_forward_backward_func``):
no pipelining at PP=1, 1F1B across stages at PP>1 (activations move by p2p over the pipeline group).

``loss_fn(batch, hidden) -> (loss, metrics)`` runs on the last stage only, on its final hidden
states (the output layer is applied in chunks by :mod:`.logprobs`); with
``calculate_per_token_loss`` set in the config the schedule neither divides by the number of
micro-batches nor by tokens, so the gradient is exactly that of ``sum(loss)`` (the caller
normalises by the global token/sequence counts, as the FSDP backend does). Returns the per
micro-batch metrics on the last stage (an empty list elsewhere).
"""
from __future__ import annotations

from functools import partial

import torch

from miles_ray.training.megatron.forward import stage_forward


def _loss_adapter(loss_fn, batch, output):
    loss, metrics = loss_fn(batch, output)
    return loss, torch.tensor(1, dtype=torch.int), metrics


def run_micro_batches(model, batches: list, loss_fn, forward_only: bool) -> list:
    """Forward (and backward unless ``forward_only``) of every batch in ``batches``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, stage):
        batch = next(data_iterator)
        return stage_forward(stage, batch, hidden=True), partial(_loss_adapter, loss_fn, batch)

    longest = max(b.input_ids.shape[1] for b in batches)
    rows = max(b.input_ids.shape[0] for b in batches)
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        seq_length=longest, micro_batch_size=rows, forward_only=forward_only)
