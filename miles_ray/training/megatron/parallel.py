"""Megatron process groups over the trainer RankGroup's torch.distributed world.

``parallel_state.initialize_model_parallel(TP, PP)`` with megatron's default order
(``tp-cp-ep-dp-pp``): the ranks of one TP group are consecutive global ranks, so with the
placement's rank -> node packing they sit on one node; DP = world / (TP x PP). The groups use the
default backend of the world group (gloo on CPU, NCCL on GPU).

Data: the driver scatters samples over *all* ranks (the FSDP contract). Ranks of one model-parallel
group (the same DP rank) must see the same samples, so :func:`gather_model_parallel` concatenates
the parts of that group's ranks in rank order; every rank then knows which slice is its own.
"""
from __future__ import annotations

import torch

from miles_ray.training import collectives


def initialize(tp: int, pp: int, seed: int = 0) -> None:
    """Megatron groups and the model-parallel RNG tracker (idempotent)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from miles_ray.training.megatron import shims

    shims.apply()
    collectives.init_single_process()  # no trainer group (one process): a world of one over gloo
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tp, pp, create_gloo_process_groups=False)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def layout() -> dict:
    """This rank's coordinates: tp/pp/dp rank and size, first/last pipeline stage."""
    from megatron.core import parallel_state as ps

    return {"tp_rank": ps.get_tensor_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp_rank": ps.get_data_parallel_rank(), "dp": ps.get_data_parallel_world_size(),
            "first": ps.is_pipeline_first_stage(), "last": ps.is_pipeline_last_stage()}


def gather_model_parallel(items: list) -> tuple[list, slice]:
    """All items of this rank's model-parallel group (TP x PP ranks) in rank order, and the slice
    that is this rank's own part."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    parts, me = collectives.all_gather_object(list(items), group=group), collectives.world(group)[0]
    start = sum(len(p) for p in parts[:me])
    return [x for p in parts for x in p], slice(start, start + len(items))


def broadcast_from_last_stage(obj):
    """``obj`` of the last pipeline stage on every stage of this pipeline."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    return collectives.broadcast_object(obj, ps.get_pipeline_model_parallel_last_rank(),
                                        ps.get_pipeline_model_parallel_group())


def gather_tp_shards(param: torch.Tensor, sharded: bool) -> list:
    """The shards of a TP-partitioned (``sharded``) parameter on every TP rank (TP-rank order); a
    replicated parameter as a one-element list."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not sharded:
        return [param.detach()]
    return collectives.all_gather(param.detach(), group=ps.get_tensor_model_parallel_group())
