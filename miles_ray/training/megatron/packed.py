"""Packed rows (``train.packing``) the megatron way: THD layout with ``PackedSeqParams``.

A packed :class:`~miles_ray.training.batching.TokenBatch` is one row of concatenated samples. It
goes through ``GPTModel.forward(..., packed_seq_params=...)`` with ``qkv_format="thd"`` and
``cu_seqlens`` = cumulative sample lengths (the row's right padding, present when sequence
parallelism rounds the length up to a multiple of TP, is one more segment: it never mixes with a
sample and is never scored). What megatron-core 0.16.1 then does:

- RoPE per sample: ``attention.py`` (lines 1081-1115) passes ``cu_seqlens`` to
  ``apply_rotary_pos_emb``, whose unfused THD path (``rope_utils.py``
  ``_apply_rotary_pos_emb_thd``) gives each sample positions 0..len-1; the rotary table is
  ``max_seqlen`` long (``rotary_pos_embedding.py`` ``get_rotary_seq_len``);
- core attention gets ``query/key/value`` as ``[t, heads, dim]`` (``attention.py`` line 1066
  squeezes the batch dim) and must confine each sample. The local spec's
  ``DotProductAttention`` refuses packed params (``dot_product_attention.py`` line 153: "Packed
  sequence is not supported by DotProductAttention. Please use TEDotProductAttention"), so the
  local spec gets :class:`VarlenDotProductAttention`: megatron's own ``DotProductAttention``
  called once per sample with a causal mask - the same arithmetic as a padded row, per sample.
  TE's ``TEDotProductAttention`` (the ``te`` spec) does THD itself and is left as is.
"""
from __future__ import annotations

import functools

import torch


def packed_seq_params(batch):
    """``PackedSeqParams`` of a packed batch (None for padded rows)."""
    if not batch.packed:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    bounds = [0]
    for n in batch.seqlens:
        bounds.append(bounds[-1] + n)
    length = batch.input_ids.shape[1]
    if bounds[-1] < length:  # the row's padding: a segment of its own
        bounds.append(length)
    cu = torch.tensor(bounds, dtype=torch.int32, device=batch.input_ids.device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


@functools.lru_cache(maxsize=1)
def _core_attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class VarlenDotProductAttention(DotProductAttention):
        """megatron's ``DotProductAttention``, plus THD input: each sample of ``cu_seqlens`` alone."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       attention_bias=attention_bias)
            bounds = packed_seq_params.cu_seqlens_q.tolist()
            parts = []
            for a, b in zip(bounds[:-1], bounds[1:]):
                causal = torch.ones(b - a, b - a, dtype=torch.bool, device=query.device).triu(1)[None, None]
                q, k, v = (t[a:b].unsqueeze(1) for t in (query, key, value))  # [s, 1, heads, dim]
                parts.append(super().forward(q, k, v, causal, attn_mask_type=attn_mask_type))
            return torch.cat(parts, dim=0).squeeze(1)  # [t, heads * dim]

    return VarlenDotProductAttention


def use_varlen_attention(spec) -> None:
    """Give a local layer spec's self-attention the THD-capable core attention (in place)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    sub = spec.submodules.self_attention.submodules
    if sub.core_attention is DotProductAttention:
        sub.core_attention = _core_attention_class()
