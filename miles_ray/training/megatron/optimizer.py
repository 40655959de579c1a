"""The distributed optimizer of the megatron backend: fp32 main parameters and fp32 gradients,
optimizer state sharded over the data-parallel ranks (ZeRO-1), as megatron-core's
``DistributedDataParallel`` + ``DistributedOptimizer`` do it.

Why a twin and not megatron's own classes on CPU: ``optimizer/distrib_optimizer.py`` (0.16.1,
lines 361-436, ``_build_model_and_main_param_groups``) accepts a parameter only when
``param.type()`` is ``torch.cuda.FloatTensor`` / ``HalfTensor`` / ``BFloat16Tensor`` (a CPU tensor
raises ``TypeError``), and ``optimizer/optimizer.py`` (lines 473-485, 907) allocates its
``found_inf`` / scale tensors with a hard-coded ``device='cuda'``; shimming ``Tensor.type`` would
change what every other caller sees. :class:`ShardedOptimizer` is the same algorithm, and runs
on CPU and GPU alike (megatron's own classes on GPUs are not wired in: see docs/megatron.md):

1. every trainable parameter gets a ``main_grad``: a view into one fp32 flat buffer (padded to a
   multiple of DP); a post-accumulate-grad hook adds the (bf16) ``param.grad`` into it and drops
   ``param.grad`` - megatron's ``_make_backward_post_hook`` (``distributed_data_parallel.py``
   lines 420-441), so micro-batches accumulate in fp32;
2. after backward (:mod:`.grads`: TP-partial and tied-embedding sums on ``main_grad``) the flat
   buffer is reduce-scattered (sum) over DP: rank ``d`` keeps the contiguous range
   ``[d * S, (d + 1) * S)`` (``param_and_grad_buffer.py``: ``reduce_scatter_tensor``);
3. global grad norm and clipping on the shard (every parameter counted once: :func:`counted`);
4. AdamW on this rank's fp32 main shard (``torch.optim.AdamW`` over one flat parameter: the
   update is elementwise, so it equals AdamW on the whole model);
5. the updated shard, cast to the model dtype, is all-gathered over DP into the parameters.

Differences from megatron's (stated in docs/megatron.md): one buffer instead of buckets (no
overlap of communication with backward), one optimizer parameter group (no weight-decay
exclusion of norms and biases: the FSDP backend decays all too), no loss scaler (bf16 needs none).

Invariant (tested): at DP=1 and DP=2 the step equals plain AdamW on fp32 gradients of the same
loss; checkpoints hold per-parameter fp32 main weights and moments (gathered over DP at save,
megatron's ``fully_reshardable`` format), so they load at another DP (or TP) size.
"""
from __future__ import annotations

import torch

from miles_ray.training import collectives


def counted(name: str, p, tp_rank: int, tied) -> bool:
    """Whether ``p`` enters the global grad norm on this rank: TP-replicated parameters on TP rank
    0 only, the tied output-layer copy of the last stage not at all."""
    from miles_ray.training.megatron.convert import tp_dim

    return p is not tied and not (tp_rank > 0 and tp_dim(name) is None)


class _Buffer:
    """One flat fp32 gradient buffer over ``params`` and this rank's fp32 main shard of it,
    sharded over ``group`` (the DP group; for experts the expert-DP group, as megatron keeps
    expert parameters in buffers of their own, ``distributed_data_parallel.py`` line 563)."""

    def __init__(self, params: list, group, norm_mask: list, initial: list):
        self.params, self.group = params, group
        self.rank, self.size = collectives.world(group)
        numel = sum(p.numel() for p in params)
        self.shard = -(-numel // self.size)
        self.grads = torch.zeros(self.shard * self.size, dtype=torch.float32, device=params[0].device)
        self.offsets, offset = [], 0
        for p in params:
            p.main_grad = self.grads[offset:offset + p.numel()].view_as(p)
            p.register_post_accumulate_grad_hook(_accumulate)
            self.offsets.append(offset)
            offset += p.numel()
        self.start = self.rank * self.shard
        self.main = torch.nn.Parameter(self.range_of([t.detach().float() for t in initial], torch.float32))
        self.norm_mask = self.range_of([torch.full((p.numel(),), bool(m)) for p, m in zip(params, norm_mask)],
                                       torch.bool)
        self.shard_grad = torch.zeros_like(self.main)

    def _overlaps(self):
        """(param index, slice of the flattened param, slice of the shard) for this rank's range."""
        lo, hi = self.start, self.start + self.shard
        for i, (p, off) in enumerate(zip(self.params, self.offsets)):
            a, b = max(lo, off), min(hi, off + p.numel())
            if a < b:
                yield i, slice(a - off, b - off), slice(a - lo, b - lo)

    def range_of(self, flats: list, dtype) -> torch.Tensor:
        """This rank's range of the concatenation of ``flats`` (one tensor per parameter)."""
        out = torch.zeros(self.shard, dtype=dtype, device=self.grads.device)
        for i, src, dst in self._overlaps():
            out[dst] = flats[i].reshape(-1)[src].to(out.device)
        return out

    def full(self, shard: torch.Tensor, dtype=None) -> list:
        """Per parameter, the full tensor of a shard-shaped ``shard`` (collective over the group)."""
        dtype = dtype or shard.dtype
        flat = torch.empty(self.shard * self.size, dtype=dtype, device=shard.device)
        collectives.all_gather_into(flat, shard.detach().to(dtype), group=self.group)
        return [flat[off:off + p.numel()].view_as(p) for p, off in zip(self.params, self.offsets)]


class ShardedOptimizer:
    """fp32 main shards + AdamW over DP-sharded state; the ``torch.optim`` surface the trainer base
    uses (``param_groups``, ``state``, ``zero_grad``, ``step``, ``state_dict``/``load_state_dict``).
    ``parts``: ``(named parameters, DP group)`` per buffer; ``counted(name, p)``: whether a
    parameter enters the grad norm on this rank; ``initial``: name -> fp32 tensor for the main
    weights (e.g. the HF weights before the cast to bf16), else the parameters themselves."""

    def __init__(self, parts: list, lr: float, weight_decay: float, counted, initial: dict | None = None):
        initial = initial or {}
        self.buffers = [_Buffer([p for _, p in named], group, [counted(n, p) for n, p in named],
                                [initial.get(n, p) for n, p in named]) for named, group in parts if named]
        self.model_params = [p for b in self.buffers for p in b.params]  # the order of state_dict()
        self.inner = torch.optim.AdamW([b.main for b in self.buffers], lr=lr, weight_decay=weight_decay)

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buffers:
            b.grads.zero_()
        for p in self.model_params:
            p.grad = None

    def reduce_scatter(self) -> None:
        """Sum the fp32 gradients over each buffer's DP group; this rank keeps its range."""
        for b in self.buffers:
            collectives.reduce_scatter(b.shard_grad, b.grads, group=b.group)

    def grad_sq_sum(self) -> torch.Tensor:
        """Sum of squares of this rank's counted gradient entries (float64); summed over all ranks
        it is the squared global norm (shards are disjoint, replicas masked by ``counted``)."""
        return sum(b.shard_grad.double().pow(2).mul(b.norm_mask).sum() for b in self.buffers)

    def scale_grads(self, coef: float) -> None:
        for b in self.buffers:
            b.shard_grad.mul_(coef)

    @torch.no_grad()
    def step(self) -> None:
        for b in self.buffers:
            b.main.grad = b.shard_grad
        self.inner.step()
        for b in self.buffers:
            b.main.grad = None
        self.publish()

    @torch.no_grad()
    def publish(self) -> None:
        """The main shards of every DP rank, cast to the model dtype, into the parameters."""
        for b in self.buffers:
            for p, full in zip(b.params, b.full(b.main, b.params[0].dtype)):
                p.copy_(full)

    # -- checkpoints: per-parameter tensors (DP-independent) ---------------------------------------
    def state_dict(self) -> dict:
        """``torch.optim``-shaped: ``state[i]`` holds :attr:`model_params` ``[i]``'s full fp32 main
        weight and moments (gathered over DP: collective); ``step`` is Adam's step count."""
        state, i = {}, 0
        for b in self.buffers:
            own = self.inner.state.get(b.main) or {}
            zeros = torch.zeros_like(b.main)
            per = {k: b.full(own.get(k, zeros)) for k in ("exp_avg", "exp_avg_sq")}
            per["main_param"] = b.full(b.main)
            step = own.get("step", torch.tensor(0.0))
            for j in range(len(b.params)):
                state[i] = {"step": step.clone(), **{k: v[j].clone() for k, v in per.items()}}
                i += 1
        group = {k: v for k, v in self.inner.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(i))}]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """The inverse of :meth:`state_dict` (this rank keeps its ranges), then :meth:`publish`."""
        i = 0
        for b in self.buffers:
            state = [sd["state"][i + j] for j in range(len(b.params))]
            i += len(b.params)
            b.main.copy_(b.range_of([s["main_param"] for s in state], torch.float32))
            self.inner.state[b.main] = {"step": torch.as_tensor(state[0]["step"], dtype=torch.float32).clone(),
                                        **{k: b.range_of([s[k] for s in state], torch.float32)
                                           for k in ("exp_avg", "exp_avg_sq")}}
        self.publish()


def build(model, lr: float, weight_decay: float, initial: dict | None = None) -> ShardedOptimizer:
    """The distributed optimizer of a megatron stage: dense parameters sharded over the DP group,
    expert parameters over the expert-DP group."""
    from megatron.core import parallel_state as ps

    from miles_ray.training.megatron import convert
    from miles_ray.training.megatron.grads import tied_copy

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tp_rank, tied = ps.get_tensor_model_parallel_rank(), tied_copy(model)
    expert = [(n, p) for n, p in named if convert.is_expert(n)]
    dense = [(n, p) for n, p in named if not convert.is_expert(n)]
    parts = [(dense, ps.get_data_parallel_group()),
             (expert, ps.get_expert_data_parallel_group() if expert else None)]
    return ShardedOptimizer(parts, lr, weight_decay, lambda n, p: counted(n, p, tp_rank, tied), initial)


def _accumulate(p) -> None:
    """megatron's backward post-hook: the grad into the fp32 ``main_grad``, ``param.grad`` dropped."""
    p.main_grad.add_(p.grad)
    p.grad = None
