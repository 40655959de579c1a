"""Gradient reduction and clipping for a megatron stage under plain ``torch.optim`` (megatron's DDP
grad buffers and optimizer wrapper are CUDA-only; see :mod:`miles_ray.training.megatron.shims`).

After the schedule's backward each rank holds the gradient of *its* samples' loss (normalised by
the global token / sequence counts) w.r.t. its shard. :func:`finalize` then
1. sums over the data-parallel group (the sum over DP ranks is the global mini-batch gradient);
2. sums over TP the grads of replicated parameters that each TP rank sees only part of: Qwen3's
   per-head Q/K norms (a rank holds some heads) and, with sequence parallelism, the
   sequence-sharded norms (as megatron's ``finalize_model_grads`` does);
3. with tied embeddings and PP > 1, sums the embedding (first stage) and output layer (last stage)
   grads over megatron's embedding group, so both copies take the same step.

:func:`clip` computes the global grad norm counting every parameter once (TP-replicated ones on TP
rank 0 only, the tied output-layer copy not at all), all-reduced over the model-parallel group -
the same number ``torch.nn.utils.clip_grad_norm_`` gives on the unsharded model - and scales by
``max_norm / (norm + 1e-6)`` when that is below 1, as torch does.
"""
from __future__ import annotations

import torch

from miles_ray.training import collectives


def _params(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _ensure_grads(model) -> None:
    for p in _params(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _tied_copy(model):
    """The last stage's output-layer weight when it is a copy of the (first stage's) embedding."""
    from megatron.core import parallel_state as ps

    if not model.share_embeddings_and_output_weights or ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    return model.shared_embedding_or_output_weight() if ps.is_pipeline_last_stage() and not model.pre_process else None


def _tp_partial(name: str, p, sequence_parallel: bool) -> bool:
    """Replicated over TP but each TP rank only sees part of its inputs: the per-head Q/K norms
    (each rank holds some heads) and, with sequence parallelism, the sequence-sharded norms."""
    return "q_layernorm" in name or "k_layernorm" in name or (sequence_parallel and getattr(p, "sequence_parallel", False))


def finalize(model, sequence_parallel: bool) -> None:
    from megatron.core import parallel_state as ps

    _ensure_grads(model)
    if ps.get_data_parallel_world_size() > 1:
        for p in _params(model):
            collectives.all_reduce_(p.grad, group=ps.get_data_parallel_group())
    if ps.get_tensor_model_parallel_world_size() > 1:
        for name, p in model.named_parameters():
            if p.requires_grad and _tp_partial(name, p, sequence_parallel):
                collectives.all_reduce_(p.grad, group=ps.get_tensor_model_parallel_group())
    if model.share_embeddings_and_output_weights and ps.get_pipeline_model_parallel_world_size() > 1:
        if ps.is_rank_in_embedding_group():
            collectives.all_reduce_(model.shared_embedding_or_output_weight().grad, group=ps.get_embedding_group())


def grad_norm(model) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    from miles_ray.training.megatron.convert import tp_dim

    tp_rank, tied = ps.get_tensor_model_parallel_rank(), _tied_copy(model)
    total = None
    for name, p in model.named_parameters():
        if not p.requires_grad or p is tied or (tp_rank > 0 and tp_dim(name) is None):
            continue
        part = p.grad.detach().double().pow(2).sum()  # on the grads' device: no sync per parameter
        total = part if total is None else total + part
    total = total if total is not None else torch.zeros((), dtype=torch.float64)
    return collectives.all_reduce_(total, group=ps.get_model_parallel_group()).sqrt()


def clip(model, max_norm: float) -> torch.Tensor:
    norm = grad_norm(model)
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        for p in _params(model):
            p.grad.mul_(coef)
    return norm
