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


def initialize(tp: int, pp: int, seed: int = 0, ep: int = 1, etp: int | None = None) -> None:
    """Megatron groups and the model-parallel RNG tracker (idempotent). ``ep``: expert-parallel
    size, ``etp``: expert tensor-parallel size (None: = ``tp``); megatron decomposes the same world
    a second time for the experts as ``etp x ep x expert-dp x pp`` (``parallel_state.py``
    ``initialize_model_parallel``, ``expert_decoder_rank_generator``), so the EP ranks of a dense
    TP group's neighbours are data-parallel ranks of the dense layout."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from miles_ray.training.megatron import shims

    shims.apply()
    collectives.init_single_process()  # no trainer group (one process): a world of one over gloo
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tp, pp, create_gloo_process_groups=False, expert_model_parallel_size=ep,
                                     expert_tensor_parallel_size=etp)
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
            "first": ps.is_pipeline_first_stage(), "last": ps.is_pipeline_last_stage(),
            "ep_rank": ps.get_expert_model_parallel_rank(), "ep": ps.get_expert_model_parallel_world_size(),
            "etp_rank": ps.get_expert_tensor_parallel_rank(), "etp": ps.get_expert_tensor_parallel_world_size(),
            "edp_rank": ps.get_expert_data_parallel_rank()}


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


def gather_tp_shards(param: torch.Tensor, sharded: bool, expert: bool = False) -> list:
    """The shards of a TP-partitioned (``sharded``) parameter on every TP rank (TP-rank order); a
    replicated parameter as a one-element list. ``expert``: an expert's parameter, split over the
    expert tensor-parallel group instead."""
    from megatron.core import parallel_state as ps

    group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
    if collectives.world(group)[1] == 1 or not sharded:
        return [param.detach()]
    return collectives.all_gather(param.detach(), group=group)
