"""Activation memory of one training micro-batch: an estimate from the layer shapes.

Assumptions (stated in docs/scale.md; not yet checked against a GPU measurement):
- attention through flash / varlen kernels (no ``tokens x tokens`` score matrix is kept);
- per token and layer, the tensors autograd keeps in the compute dtype: the two norms' inputs and
  outputs (4 x hidden), q, k, v and the attention output (GQA), or MLA's low-rank
  intermediates, expanded k / v and output; a SwiGLU MLP keeps gate, up, act(gate) and their
  product (4 x intermediate); a MoE layer keeps that for each of ``num_experts_per_tok`` experts
  plus the dispatched copies of the token (2 x hidden each) and fp32 router logits;
- gradient checkpointing keeps each layer's input (hidden) and one layer's activations
  (recomputed in backward);
- the embedding output (hidden per token); the log-prob chunk is a separate item.
"""
from __future__ import annotations

from miles_ray.plan.params import Inventory, num_experts


def _attention(c: dict) -> int:
    """Elements kept per token by one attention block (norm in/out included)."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    if "kv_lora_rank" in c:  # MLA
        qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        low = 2 * (c.get("q_lora_rank") or 0) + 2 * c["kv_lora_rank"] + c["qk_rope_head_dim"]
        return 2 * h + low + heads * (2 * qk + c["qk_nope_head_dim"] + 2 * c["v_head_dim"])
    d = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads", heads) * d
    return 2 * h + 2 * heads * d + 2 * kv


def _mlp(c: dict, kind: str, compute_bytes: int) -> int:
    """Elements kept per token by one MLP block (norm in/out included)."""
    h = c["hidden_size"]
    if kind == "dense":
        return 2 * h + 4 * c["intermediate_size"]
    k = c.get("num_experts_per_tok", 1)
    inter = c.get("moe_intermediate_size") or c["intermediate_size"]
    shared = 4 * inter * c.get("n_shared_experts", 0)
    router = num_experts(c) * 4 // compute_bytes  # fp32 logits
    return 2 * h + k * (4 * inter + 2 * h) + shared + router


def per_token_layer(c: dict, kind: str, compute_bytes: int) -> int:
    return _attention(c) + _mlp(c, kind, compute_bytes)


def activation_bytes(c: dict, inv: Inventory, tokens: int, compute_bytes: int, checkpointing: bool) -> int:
    """Bytes of activations one micro-batch of ``tokens`` keeps for backward."""
    layers = [per_token_layer(c, layer.kind, compute_bytes) for layer in inv.layers]
    h = c["hidden_size"]
    if checkpointing:
        per_token = len(layers) * h + max(layers) + h
    else:
        per_token = sum(layers) + h
    return tokens * per_token * compute_bytes
