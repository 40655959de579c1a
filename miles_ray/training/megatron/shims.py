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

Not shimmed (kept out of the way instead): megatron's optimizer wrapper (``optimizer.py``
hard-codes ``device='cuda'``) - :mod:`miles_ray.training.megatron.trainer` uses a plain ``torch.optim``
optimizer behind the same interface as the FSDP backend; megatron's DDP grad buffers - gradients
are reduced by :mod:`miles_ray.training.megatron.grads`.

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
    _APPLIED = True
    return True
