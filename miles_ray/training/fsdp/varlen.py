"""Attention confined to each packed sample (varlen), registered as a transformers attention
implementation named ``miles_varlen``.

Trainer models use it for both layouts of :mod:`miles_ray.training.batching`:
- packed rows carry ``cu_seq_lens_q`` (cumulative sample lengths): each sample's queries attend
  causally to its own keys only. On CUDA in bf16/fp16 one flash-attention varlen call per layer
  (``flash_attn_varlen_func`` when flash-attn is installed, else PyTorch's own
  ``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10); otherwise one SDPA call per sample;
- right-padded rows carry no lengths: plain causal SDPA over the row, which is exact for the real
  tokens (they never look right, where the padding is).

transformers builds no mask for an implementation it does not know (``masking_utils``:
``_preprocess_mask_arguments`` returns early), so no ``[T, T]`` mask is ever materialised.
"""
from __future__ import annotations

import functools
import inspect

import torch

NAME = "miles_varlen"


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


@functools.lru_cache(maxsize=1)
def _flash_kernel():
    """A varlen kernel taking ``(q, k, v [T, H, D], cu, longest, scale)``, or None."""
    try:
        from flash_attn import flash_attn_varlen_func  # GPU images with flash-attn only
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:
        return lambda q, k, v, cu, n, scale: flash_attn_varlen_func(q, k, v, cu, cu, n, n, softmax_scale=scale,
                                                                     causal=True)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}  # the API changed in 2.11

    def kernel(q, k, v, cu, n, scale):
        if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat the KV heads (older varlen_attn lacks GQA)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        extra = {"scale": scale} if "scale" in params else {}
        return varlen_attn(q, k, v, cu, cu, n, n, **causal, **extra)

    return kernel


def _half_dtype(query: torch.Tensor):
    """The 16-bit dtype a flash kernel can run in: the query's, or under CUDA autocast its dtype
    (RoPE in fp32 promotes q and k to fp32 there, while SDPA would cast them back down)."""
    if not query.is_cuda:
        return None
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return dtype if dtype in (torch.float16, torch.bfloat16) else None
    return None


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``query/key/value``: ``[B, H, T, D]``; returns ``([B, T, H, D], None)`` like transformers'."""
    sdpa = _sdpa()
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    half = _half_dtype(query)
    kernel = _flash_kernel() if half is not None and not dropout else None
    if kernel is not None:
        q, k, v = (t[0].transpose(0, 1).to(half) for t in (query, key, value))  # [T, H, D]
        cu32 = cu.to(device=q.device, dtype=torch.int32)
        longest = int((cu32[1:] - cu32[:-1]).max())
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        return kernel(q, k, v, cu32, longest, scale).unsqueeze(0), None
    bounds = cu.tolist()
    parts = [sdpa(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, dropout=dropout, scaling=scaling,
                  is_causal=True)[0] for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(parts, dim=1), None


def use_varlen_attention(model) -> None:
    """Register the implementation (idempotent) and switch ``model`` (a transformers model) to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    model.set_attn_implementation(NAME)
