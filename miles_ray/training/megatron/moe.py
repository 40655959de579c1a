"""MoE pieces of the megatron backend besides the conversion (:mod:`.convert`) and the layout
(:mod:`.parallel`, :mod:`.validate`):

- the uneven sequence-parallel gather / reduce-scatter that megatron's alltoall token dispatcher
  issues over the TP group when TP > 1 (``token_dispatcher.py``, ``token_dispatch`` /
  ``combine_preprocess``: ``output_splits_tp`` / ``input_split_sizes``), for gloo, which refuses
  differently sized all-gather parts (installed by :mod:`.shims`, shim 8; NCCL takes megatron's own);
- R3 on megatron's router (:class:`RouterReplay`).
"""
from __future__ import annotations

import torch

from miles_ray.training import collectives
from miles_ray.models.moe import count_agreement


def _own_slice(full: torch.Tensor, sizes: list, group) -> torch.Tensor:
    rank = collectives.world(group)[0]
    start = sum(sizes[:rank])
    return full[start:start + sizes[rank]]


class _GatherUneven(torch.autograd.Function):
    """forward: all-gather of parts of ``sizes`` rows; backward: sum over ranks, own rows."""

    @staticmethod
    def forward(ctx, tensor, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return collectives.all_gather_uneven(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        full = collectives.all_reduce_(grad.contiguous().clone(), group=ctx.group)
        return _own_slice(full, ctx.sizes, ctx.group).clone(), None, None


class _ScatterUneven(torch.autograd.Function):
    """forward: sum over ranks, then this rank's rows; backward: the uneven all-gather."""

    @staticmethod
    def forward(ctx, tensor, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        full = collectives.all_reduce_(tensor.contiguous().clone(), group=group)
        return _own_slice(full, sizes, group).clone()

    @staticmethod
    def backward(ctx, grad):
        return collectives.all_gather_uneven(grad.contiguous(), ctx.sizes, ctx.group), None, None


def _sizes(split) -> list:
    return [int(x) for x in split]


def gather_sp_region(megatron_gather):
    """megatron's ``gather_from_sequence_parallel_region`` with uneven parts done by
    :class:`_GatherUneven` (even parts: megatron's own)."""

    def gather(input_, tensor_parallel_output_grad=True, group=None, output_split_sizes=None,
               use_global_buffer=False):
        if output_split_sizes is None or group is None:
            return megatron_gather(input_, tensor_parallel_output_grad, group, output_split_sizes, use_global_buffer)
        return _GatherUneven.apply(input_, _sizes(output_split_sizes), group)

    return gather


def scatter_sp_region(megatron_scatter):
    """megatron's ``reduce_scatter_to_sequence_parallel_region`` with uneven parts done by
    :class:`_ScatterUneven` (even parts: megatron's own)."""

    def scatter(input_, group=None, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group is None:
            return megatron_scatter(input_, group, input_split_sizes, use_global_buffer)
        return _ScatterUneven.apply(input_, _sizes(input_split_sizes), group)

    return scatter


# -- R3: routing replay on megatron's router -------------------------------------------------------
class _LayerReplay:
    """What megatron's ``TopKRouter`` calls as its ``router_replay`` (``moe_utils.py``
    ``topk_routing_with_score_function`` -> ``compute_topk`` -> ``router_replay.get_replay_topk
    (scores, topk, num_groups, group_topk, default_compute_topk)``, returning ``(top scores,
    top indices)``). The router's own top-k is computed first; where rollout recorded experts for
    a token they replace it (R3, ``replay``), and the scores of the used experts are gathered from
    the trainer's own ``scores`` - so the gates come from the trainer's router (which gets
    gradients) over the replayed experts: with ``moe_router_pre_softmax=False`` megatron then takes
    the softmax over the gathered logits, which is HF's softmax over all experts renormalised over
    the top-k (``norm_topk_prob``), as :class:`miles_ray.models.moe.Routing` does on the FSDP path."""

    def __init__(self, owner: "RouterReplay", layer: int):
        self.owner, self.layer = owner, layer

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        own_scores, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        reference = self.owner.reference
        if reference is None:
            return own_scores, own
        if reference.shape[0] != own.shape[0]:
            raise RuntimeError(f"routing reference holds {reference.shape[0]} tokens, the router {own.shape[0]}")
        recorded = reference[:, self.layer].to(own.device)
        known = recorded[:, 0] >= 0
        used = torch.where(known[:, None], recorded, own) if self.owner.replay else own
        if self.owner.counting:
            self.owner.count(own, recorded, used, known)
        if not self.owner.replay:
            return own_scores, own
        return scores.gather(1, used), used


class RouterReplay:
    """R3 and the routing agreement on a megatron stage: one :class:`_LayerReplay` per router (set as
    its ``router_replay``, megatron's own hook point), the recorded experts of the next forward's
    tokens in megatron's order (:meth:`set_batch`), and the agreement counts (``slots``: token x
    layer slots with a recording; ``own_agree`` / ``used_agree``: the router's own top-k set / the
    experts used equal the recorded set), as :class:`miles_ray.models.moe.Routing` counts them.

    Token order: megatron's router sees ``[S, B, E]`` flattened sequence-major (token ``s * B +
    b``); under sequence parallelism TP rank ``r`` sees positions ``[r S / tp, (r + 1) S / tp)``;
    a pipeline stage holds layers ``[offset, offset + n)`` of the trace."""

    def __init__(self, model, layer_offset: int, replay: bool, sequence_parallel: bool):
        from megatron.core.transformer.moe.router import TopKRouter

        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        for i, router in enumerate(routers):
            router.router_replay = _LayerReplay(self, layer_offset + i)
        self.is_moe, self.replay, self.sequence_parallel = bool(routers), replay, sequence_parallel
        self.reference, self.counting = None, False
        self.stats = {"slots": 0, "own_agree": 0, "used_agree": 0}

    def set_batch(self, batch) -> None:
        """The recorded experts of ``batch``'s tokens as this rank's routers will see them (None:
        nothing recorded); agreement is counted from here until :meth:`stop_counting`."""
        routing = getattr(batch, "routing", None)
        if routing is None or not self.is_moe:
            self.reference, self.counting = None, False
            return
        seq_first = routing.transpose(0, 1)  # [L, R, layers, k]
        if self.sequence_parallel:
            from megatron.core import parallel_state as ps

            tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
            seq_first = seq_first.chunk(tp)[rank]
        self.reference, self.counting = seq_first.reshape(-1, *routing.shape[2:]), True

    def stop_counting(self) -> None:
        self.counting = False

    def take_stats(self) -> dict:
        out, self.stats = dict(self.stats), {"slots": 0, "own_agree": 0, "used_agree": 0}
        return out

    @torch.no_grad()
    def count(self, own, recorded, used, known) -> None:
        count_agreement(self.stats, own, recorded, used, known)


class ReplayBatches(list):
    """The micro-batches, which tell ``replay`` the recorded experts of each one as megatron's
    schedule takes it (``next(data_iterator)`` right before that micro-batch's forward, at PP=1
    and in 1F1B alike); backward does not re-route (no recompute under R3: refused at start)."""

    def __init__(self, batches: list, replay: RouterReplay | None):
        super().__init__(batches)
        self.replay = replay

    def __iter__(self):
        for batch in list.__iter__(self):
            if self.replay is not None:
                self.replay.set_batch(batch)
            yield batch
        if self.replay is not None:
            self.replay.set_batch(None)


def agreement(stats: dict) -> dict:
    """``routing_agreement`` (experts used = recorded; 1 under R3) and ``routing_agreement_own``
    (the router's own top-k = recorded) over all ranks, as the FSDP backend reports them: every
    token x layer slot is counted on exactly one rank (SP: TP ranks hold disjoint positions; PP:
    stages hold disjoint layers; DP: disjoint samples)."""
    slots, used, own = collectives.all_sum([float(stats["slots"]), float(stats["used_agree"]),
                                            float(stats["own_agree"])])
    return {"routing_agreement": used / slots, "routing_agreement_own": own / slots} if slots else {}
