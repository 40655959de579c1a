"""A slot-KV-cache forward pass over a transformers Llama / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral model.

The HF module's own submodules (projections, norms, rotary embedding, MLP) are called, so the
weights are shared with the HF model: an in-place weight update is seen here at once.

Slots: the cache holds ``slots`` sequences; the running batch always occupies slots ``0..B-1``
(the scheduler compacts on finish), so decode reads the cache through views, not gathers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from miles_ray.models.kv_cache import SlotCache  # noqa: F401  (re-exported: the engine's cache)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")  # MoE blocks run as the HF module


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x, cos, sin):  # x [B, H, S, D]; cos/sin [B, S, D]
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


class NativeForward:
    def __init__(self, hf_model):
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"native engine supports {SUPPORTED_MODEL_TYPES}, not '{cfg.model_type}'; "
                             "use rollout.backend=hf")
        self.hf = hf_model
        self.layers = hf_model.model.layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5

    @staticmethod
    def cache_capacity(needed: int, current: int = 0) -> int:
        """Capacity to allocate for ``needed`` positions: at least 128, growing by doubling."""
        return max(needed, 128, 2 * current)

    def new_cache(self, slots: int, capacity: int) -> SlotCache:
        p = next(self.hf.parameters())
        return SlotCache(len(self.layers), slots, self.n_kv, self.head_dim, capacity, p.dtype, p.device)

    def _qkv(self, attn, h, positions):
        B, S, _ = h.shape
        q = attn.q_proj(h).view(B, S, self.n_heads, self.head_dim)
        k = attn.k_proj(h).view(B, S, self.n_kv, self.head_dim)
        v = attn.v_proj(h).view(B, S, self.n_kv, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self.hf.model.rotary_emb(h, positions)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _block(self, layer, x, attend):
        h = layer.input_layernorm(x)
        out = attend(layer.self_attn, h)
        x = x + layer.self_attn.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _logits(self, x):
        return self.hf.lm_head(self.hf.model.norm(x)).float()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, cache: SlotCache, slots: torch.Tensor):
        """Right-padded prompts ``ids [N, P]`` (true ``lengths``) into ``slots``; returns the logits
        at each prompt's last token ``[N, V]``. Causal attention alone keeps padding out of valid rows."""
        N, P = ids.shape
        positions = torch.arange(P, device=ids.device).expand(N, P)
        x = self.hf.model.embed_tokens(ids)
        for li, layer in enumerate(self.layers):
            def attend(attn, h, li=li):
                q, k, v = self._qkv(attn, h, positions)
                cache.k[li, slots, :, :P] = k
                cache.v[li, slots, :, :P] = v
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                      enable_gqa=self.n_kv != self.n_heads)
            x = self._block(layer, x, attend)
        cache.lengths[slots] = lengths
        last = x[torch.arange(N, device=ids.device), lengths - 1]
        return self._logits(last)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """One token for each of the ``B`` running sequences in slots ``0..B-1``; returns ``[B, V]``."""
        B = tokens.shape[0]
        pos = cache.lengths[:B].clone()
        T = int(pos.max()) + 1
        rows = torch.arange(B, device=tokens.device)
        mask = (torch.arange(T, device=tokens.device)[None, :] <= pos[:, None])[:, None, None, :]
        x = self.hf.model.embed_tokens(tokens[:, None])
        for li, layer in enumerate(self.layers):
            def attend(attn, h, li=li):
                q, k, v = self._qkv(attn, h, pos[:, None])
                cache.k[li, rows, :, pos] = k[:, :, 0]
                cache.v[li, rows, :, pos] = v[:, :, 0]
                K, V = cache.k[li, :B, :, :T], cache.v[li, :B, :, :T]
                return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=self.scale,
                                                      enable_gqa=self.n_kv != self.n_heads)
            x = self._block(layer, x, attend)
        cache.lengths[:B] = pos + 1
        return self._logits(x[:, 0])

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, n_valid: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """``T`` new tokens for each of the ``B`` running sequences (right-padded; ``n_valid [B]`` are
        real) appended after each slot's cached prefix; returns logits ``[B, T, V]``. Used to verify
        draft tokens and to catch the draft up. Padded positions are written to the cache too, but
        lie beyond the new length, so later calls overwrite them before anything attends to them."""
        B, T = tokens.shape
        pos = cache.lengths[:B].clone()
        positions = pos[:, None] + torch.arange(T, device=tokens.device)[None, :]  # [B, T]
        span = int(pos.max()) + T
        rows = torch.arange(B, device=tokens.device)[:, None].expand(B, T)
        keys = torch.arange(span, device=tokens.device)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, span]
        x = self.hf.model.embed_tokens(tokens)
        for li, layer in enumerate(self.layers):
            def attend(attn, h, li=li):
                q, k, v = self._qkv(attn, h, positions)
                cache.k[li, rows, :, positions] = k.transpose(1, 2)
                cache.v[li, rows, :, positions] = v.transpose(1, 2)
                K, V = cache.k[li, :B, :, :span], cache.v[li, :B, :, :span]
                return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=self.scale,
                                                      enable_gqa=self.n_kv != self.n_heads)
            x = self._block(layer, x, attend)
        cache.lengths[:B] = pos + n_valid
        return self._logits(x)
