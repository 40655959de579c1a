"""Every CPU shim megatron-core needs, in one place; applied only when CUDA is absent.

megatron-core 0.16.1's model code is device-agnostic except for a handful of calls that assume a
CUDA device. On a torch without CUDA, :func:`apply` replaces exactly these (and nothing else):

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``. Megatron allocates with
   ``device=torch.cuda.current_device()`` in RoPE (``rotary_pos_embedding.py``: ``inv_freq``), the
   global memory buffer (``utils.py``), TP gathers (``tensor_parallel/layers.py``, ``utils.py``),
   pipeline p2p buffers (``p2p_communication.py``) and the DDP grad buffer.
2. ``torch.cuda.synchronize`` -> no-op (``p2p_communication.py`` calls it after p2p ops; CPU ops
   are synchronous).
3. The CUDA RNG state used by the model-parallel RNG tracker (``tensor_parallel/random.py``):
   ``torch.cuda.get_rng_state`` / ``torch.cuda.manual_seed`` and megatron's
   ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> the CPU generator's state. Only dropout
   draws from it; dropout is 0 in every config built here, so numerics are unaffected.
4. ``pipeline_parallel/schedules.py`` creates its token counter with
   ``torch.zeros([], device="cuda")`` (hard-coded): the module's ``torch`` name is given a proxy
   whose ``zeros`` maps ``device="cuda"`` to CPU; every other attribute is torch's own.
5. ``torch.Tensor.cuda`` -> the tensor itself: ``language_module.py`` moves the tied output-layer
   copy of the last pipeline stage with ``weight.data.cuda()`` before all-reducing it over the
   embedding group (PP > 1 with tied embeddings). Without CUDA the call could only raise.
6. ``moe/moe_utils.py`` reads a module global ``te_general_gemm`` that is only defined when
   Transformer Engine imports (``NameError`` in the MoE router otherwise) -> set to ``None``, the
   value megatron's own code tests for (MoE models only).
7. ``moe/token_dispatcher.py``'s alltoall dispatcher creates a ``torch.cuda.Stream()`` in its
   constructor and moves the split sizes to the host on it (``_maybe_dtoh_and_synchronize``:
   ``torch.cuda.current_stream`` / ``stream`` / ``Stream.record_event`` / ``Event.synchronize``):
   the module's ``torch`` name is a proxy whose ``cuda`` attribute gives torch's CPU streams
   (``torch.cpu.Stream``, ``current_stream``, ``stream``), which have the same methods and do
   nothing (CPU ops are synchronous); ``record_event`` returns an always-completed event
   (torch's CPU stream returns None). The dispatcher's ``maybe_move_tensor_to_cpu``
   (``moe_utils.py`` line 1078) returns numpy split sizes only for CUDA tensors; CPU split tensors
   would reach ``all_to_all_single``, whose torch 2.13 binding takes sequences of ints only, so the
   module's name gets a version that converts CPU tensors too (as_numpy). The all-to-all itself
   is gloo's ``all_to_all_single``
   (uneven splits supported, checked on torch 2.13).
8. The same dispatcher under TP > 1 gathers / reduce-scatters the tokens of the TP ranks with
   *uneven* parts (``gather_from_sequence_parallel_region(..., output_split_sizes=...)``,
   ``reduce_scatter_to_sequence_parallel_region(..., input_split_sizes=...)``), which end in a list
   ``all_gather`` of differently sized tensors: NCCL takes it, gloo raises ``invalid tensor size``.
   The module's two names get wrappers (:mod:`miles_ray.training.megatron.moe`) that do the uneven
   case with an equal-size (padded) all-gather and an all-reduce; even parts go to megatron's own.

Not shimmed (kept out of the way instead): megatron's ``DistributedOptimizer`` (it accepts only
``torch.cuda.*Tensor`` parameters, ``distrib_optimizer.py`` lines 361-436, and its base hard-codes
``device='cuda'``) and DDP grad buffers - :mod:`miles_ray.training.megatron.optimizer` is the same
algorithm (fp32 main shards, reduce-scatter, all-gather), gradients finalised by
:mod:`miles_ray.training.megatron.grads`; the local spec's ``DotProductAttention`` refuses packed
(THD) input - :mod:`miles_ray.training.megatron.packed` subclasses it.

Idempotent; a no-op where ``torch.cuda.is_available()``, except 6, which :func:`apply_te_absent`
applies wherever Transformer Engine is absent (found on an H100 without TE: the MoE router's
``NameError`` is not a CPU matter).
"""
from __future__ import annotations

import types

import torch

_APPLIED = False


class _CpuZerosTorch(types.SimpleNamespace):
    """``torch`` for ``schedules.py``: ``zeros(..., device="cuda")`` lands on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)


class _DoneEvent:
    """An event that has always completed (CPU work is synchronous)."""

    def synchronize(self) -> None:
        return None


class _CpuStream(torch.cpu.Stream):
    """``torch.cpu.Stream`` whose ``record_event`` gives an event (torch's returns None)."""

    def record_event(self, event=None):
        return _DoneEvent()


class _CpuStreamsCuda(types.SimpleNamespace):
    """``torch.cuda`` for ``token_dispatcher.py``: streams are the CPU's (no-op) streams."""

    Stream = _CpuStream
    current_stream = staticmethod(torch.cpu.current_stream)
    stream = staticmethod(torch.cpu.stream)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuStreamsTorch(types.SimpleNamespace):
    """``torch`` for ``token_dispatcher.py``: everything torch's own except ``cuda`` (shim 7)."""

    cuda = _CpuStreamsCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def _splits_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's ``maybe_move_tensor_to_cpu`` for CPU tensors: numpy when asked (shim 7)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


def apply_te_absent() -> None:
    """Shim 6: ``te_general_gemm = None`` in megatron's MoE utilities when TE did not define it."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply() -> bool:
    """Install the shims when CUDA is absent; returns whether they are (now) installed."""
    global _APPLIED
    apply_te_absent()
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    import megatron.core.tensor_parallel.random as rng

    rng._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    rng._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    import megatron.core.pipeline_parallel.schedules as schedules

    schedules.torch = _CpuZerosTorch()
    import megatron.core.transformer.moe.token_dispatcher as dispatcher

    dispatcher.torch = _CpuStreamsTorch()
    dispatcher.maybe_move_tensor_to_cpu = _splits_to_host
    from miles_ray.training.megatron import moe

    dispatcher.gather_from_sequence_parallel_region = moe.gather_sp_region(
        dispatcher.gather_from_sequence_parallel_region)
    dispatcher.reduce_scatter_to_sequence_parallel_region = moe.scatter_sp_region(
        dispatcher.reduce_scatter_to_sequence_parallel_region)
    _APPLIED = True
    return True
