"""Gradient reduction and clipping for a megatron stage under the distributed optimizer
(:mod:`miles_ray.training.megatron.optimizer`): gradients live in each parameter's fp32
``main_grad`` (a view into the optimizer's flat buffer), as under megatron's DDP.

After the schedule's backward each rank holds the gradient of *its* samples' loss (normalised by
the global token / sequence counts) w.r.t. its shard. :func:`finalize` then, in the order of
megatron's ``finalize_model_grads`` (``distributed/finalize_model_grads.py``) except that the DP
step comes last (sums commute):
1. sums over TP the grads of replicated parameters that each TP rank sees only part of: Qwen3's
   per-head Q/K norms (a rank holds some heads) and, with sequence parallelism, the
   sequence-sharded norms;
2. with tied embeddings and PP > 1, sums the embedding (first stage) and output layer (last stage)
   grads over megatron's embedding group, so both copies take the same step;
3. reduce-scatters the flat fp32 buffer over the data-parallel group (the sum over DP ranks is the
   global mini-batch gradient); each rank keeps its optimizer shard.

:func:`clip` computes the global grad norm over the shards, counting every parameter once
(TP-replicated ones on TP rank 0 only, the tied output-layer copy not at all:
:func:`~miles_ray.training.megatron.optimizer.counted`), summed over every rank (the DP shards are
disjoint) - the number ``torch.nn.utils.clip_grad_norm_`` gives on the unsharded model - and scales by
``max_norm / (norm + 1e-6)`` when that is below 1, as torch does.
"""
from __future__ import annotations

import torch

from miles_ray.training import collectives


def tied_copy(model):
    """The last stage's output-layer weight when it is a copy of the (first stage's) embedding."""
    from megatron.core import parallel_state as ps

    if not model.share_embeddings_and_output_weights or ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    return model.shared_embedding_or_output_weight() if ps.is_pipeline_last_stage() and not model.pre_process else None


def _tp_partial(name: str, p, sequence_parallel: bool) -> bool:
    """Replicated over TP but each TP rank only sees part of its inputs: the per-head Q/K norms
    (each rank holds some heads) and, with sequence parallelism, the sequence-sharded norms."""
    return "q_layernorm" in name or "k_layernorm" in name or (sequence_parallel and getattr(p, "sequence_parallel", False))


def finalize(model, optimizer, sequence_parallel: bool) -> None:
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:
        for name, p in model.named_parameters():
            if p.requires_grad and _tp_partial(name, p, sequence_parallel):
                collectives.all_reduce_(p.main_grad, group=ps.get_tensor_model_parallel_group())
    if model.share_embeddings_and_output_weights and ps.get_pipeline_model_parallel_world_size() > 1:
        if ps.is_rank_in_embedding_group():
            collectives.all_reduce_(model.shared_embedding_or_output_weight().main_grad, group=ps.get_embedding_group())
    optimizer.reduce_scatter()


def clip(optimizer, max_norm: float) -> torch.Tensor:
    norm = collectives.all_reduce_(optimizer.grad_sq_sum()).sqrt()  # every rank's shards
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        optimizer.scale_grads(coef)
    return norm
