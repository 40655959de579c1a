"""Attention confined to each packed sample (varlen), registered as a transformers attention
implementation named ``miles_varlen``.

Trainer models use it for both layouts of :mod:`miles_ray.training.batching`:
- packed rows carry ``cu_seq_lens_q`` (cumulative sample lengths): each sample's queries attend
  causally to its own keys only (per-sample SDPA; on CUDA with ``flash_attn`` installed, one
  ``flash_attn_varlen_func`` call instead);
- right-padded rows carry no lengths: plain causal SDPA over the row, which is exact for the real
  tokens (they never look right, where the padding is).

transformers builds no mask for an implementation it does not know (``masking_utils``:
``_preprocess_mask_arguments`` returns early), so no ``[T, T]`` mask is ever materialised.
"""
from __future__ import annotations

import torch

NAME = "miles_varlen"


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # GPU images only
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``query/key/value``: ``[B, H, T, D]``; returns ``([B, T, H, D], None)`` like transformers'."""
    sdpa = _sdpa()
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    flash = _flash_varlen() if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
        cu32 = cu.to(device=q.device, dtype=torch.int32)
        longest = int((cu32[1:] - cu32[:-1]).max())
        out = flash(q, k, v, cu32, cu32, longest, longest, dropout_p=dropout, softmax_scale=scaling, causal=True)
        return out.unsqueeze(0), None
    bounds = cu.tolist()
    parts = [sdpa(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, dropout=dropout, scaling=scaling,
                  is_causal=True)[0] for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(parts, dim=1), None


def use_varlen_attention(model) -> None:
    """Register the implementation (once) and switch ``model`` (a transformers model) to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)  # idempotent
    model.set_attn_implementation(NAME)
