"""The row-invariant ("exact") forward behind ``algorithm.true_on_policy``.

Engines and trainers must produce bit-identical log-probs for every sampled token, although the
engine decodes one token per step against a KV cache and the trainer runs whole sequences. Every
op computes a token's numbers with the same kernel calls whatever else is in the batch, wherever
the operands lie in memory and whatever the thread count (:mod:`miles_ray.models.exact_ops`):

- products (projections, MLPs, experts, router, LM head): one ``[1, K] x [K, N]`` product per row
  (``torch.bmm`` with the weight broadcast, not copied), in calls of exactly ``CHUNK`` entries whose
  operands sit at canonical addresses (64-byte aligned; a misaligned weight is copied first);
- attention (:mod:`miles_ray.models.exact_attention`): fixed-shape products read in place from the
  engine's slot KV layout (no per-token copy; memory linear in length), every query reducing over
  the same ``max_len`` keys with future ones masked to exact zeros;
- row reductions (RMSNorm, softmax, log-softmax) in calls of exactly ``CHUNK`` rows; transcendental
  element-wise ops (SiLU, RoPE's cos/sin) in fixed blocks on ATen's vector path; the rest
  (residuals, RoPE's products) is exactly rounded element-wise arithmetic;
- MoE: router logits by row, softmax in fp32, top-k, each selected expert by row, the weighted sum
  in top-k order.

Gradients flow (the trainer trains through it); backward uses ordinary matmuls and SDPA (they need
no invariance). Cost: several times slower than the stock forward (see docs); tiny and small
models. :func:`~miles_ray.models.exact_check.self_test` probes it at startup at the run's lengths,
batch sizes and thread counts and with misaligned weights; ``true_on_policy`` is refused where it
fails.
"""
from __future__ import annotations

import torch

from miles_ray.errors import UserError
from miles_ray.models.exact_attention import ExactAttention, ExactCache, window_attend
from miles_ray.models.exact_check import self_test  # noqa: F401 (re-exported)
from miles_ray.models.exact_ops import (CHUNK, align_parameters, by_rows, fixed_bmm, pointwise,  # noqa: F401
                                        row_linear, softmax32)

__all__ = ["CHUNK", "ExactForward", "ExactLMForTraining", "by_rows", "exact_logprobs", "fixed_bmm", "row_linear",
           "self_test"]


def _lin(module, x):
    return row_linear(x, module.weight, getattr(module, "bias", None))


def _rope(x, cos, sin):  # x [N, H, D], cos/sin [N, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class ExactForward:
    """Row-invariant forward over a transformers Llama / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral model
    (its weights, shared), with a slot KV cache of fixed capacity ``max_len``."""

    def __init__(self, hf_model, max_len: int):
        cfg = hf_model.config
        self.hf, self.max_len = hf_model, max_len
        self.layers = hf_model.model.layers
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        align_parameters(hf_model)  # canonical weight addresses: no per-call copies

    # -- pieces ---------------------------------------------------------------------------------
    def _cos_sin(self, positions, dtype):
        """RoPE tables at ``positions [N]``: the model's ``inv_freq``, cos/sin per element."""
        rot = self.hf.model.rotary_emb
        freqs = positions.float()[:, None] * rot.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = getattr(rot, "attention_scaling", 1.0)
        cos, sin = pointwise(torch.cos, emb) * scaling, pointwise(torch.sin, emb) * scaling
        return cos.to(dtype), sin.to(dtype)

    def _qkv(self, attn, h, positions):
        """``h [N, d]`` at absolute ``positions [N]`` -> q ``[N, H, D]``, k and v ``[N, H_kv, D]``."""
        N = h.shape[0]
        q = _lin(attn.q_proj, h).view(N, self.n_heads, self.head_dim)
        k = _lin(attn.k_proj, h).view(N, self.n_kv, self.head_dim)
        v = _lin(attn.v_proj, h).view(N, self.n_kv, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = by_rows(attn.q_norm, q), by_rows(attn.k_norm, k)
        cos, sin = self._cos_sin(positions, h.dtype)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _mlp(self, mlp, h):
        if hasattr(mlp, "experts"):
            return self._moe(mlp, h)
        return _lin(mlp.down_proj, pointwise(mlp.act_fn, _lin(mlp.gate_proj, h)) * _lin(mlp.up_proj, h))

    def _moe(self, block, h):
        router, experts = block.gate, block.experts
        probs = by_rows(softmax32, row_linear(h, router.weight))
        weights, index = torch.topk(probs, router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for slot in range(router.top_k):  # fixed order: the weighted sum reduces identically everywhere
            e = index[:, slot]
            gate_up = fixed_bmm(h.unsqueeze(1), experts.gate_up_proj[e].transpose(1, 2)).squeeze(1)
            gate, up = gate_up.chunk(2, dim=-1)
            act = pointwise(experts.act_fn, gate) * up
            y = fixed_bmm(act.unsqueeze(1), experts.down_proj[e].transpose(1, 2)).squeeze(1)
            out = out + y * weights[:, slot, None].to(y.dtype)
        return out

    def logits(self, x):
        """Final norm, then the LM head row by row, in fp32."""
        return _lin(self.hf.lm_head, by_rows(self.hf.model.norm, x)).float()

    def _layer(self, layer, x, positions, attend):
        """One decoder layer over rows ``x [N, d]``; ``attend(q, k, v) -> [N, H * D]``."""
        h = by_rows(layer.input_layernorm, x)
        q, k, v = self._qkv(layer.self_attn, h, positions)
        x = x + _lin(layer.self_attn.o_proj, attend(q, k, v))
        return x + self._mlp(layer.mlp, by_rows(layer.post_attention_layernorm, x))

    # -- whole sequences (trainer) --------------------------------------------------------------
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Right-padded rows ``ids [R, L]`` -> last hidden states ``[R, L, d]`` (gradients flow):
        attention as the engine's prefill computes it, over a scratch slot layout."""
        R, L = ids.shape
        self._check_len(L)
        positions = torch.arange(L, device=ids.device).repeat(R)

        def attend(q, k, v):
            shape = lambda t: t.view(R, L, *t.shape[1:])  # noqa: E731
            out = ExactAttention.apply(shape(q), shape(k), shape(v), self.max_len, self.scale)
            return out.reshape(R * L, -1)

        x = self.hf.model.embed_tokens(ids).reshape(R * L, -1)
        for layer in self.layers:
            x = self._layer(layer, x, positions, attend)
        return x.view(R, L, -1)

    def _check_len(self, L: int) -> None:
        if L > self.max_len:
            raise ValueError(f"a sequence of {L} tokens exceeds the exact forward's max_len={self.max_len}")

    # -- engine interface (NativeForward's) -----------------------------------------------------
    def cache_capacity(self, needed: int, current: int = 0) -> int:
        """Always ``max_len`` (the attention's fixed key length); more is an error."""
        if needed > self.max_len:
            raise UserError(f"a request needs {needed} positions; true on-policy mode holds at most max_len="
                            f"{self.max_len} (raise algorithm.true_on_policy_max_len, or lower data.max_prompt_tokens / "
                            "rollout.max_new_tokens)")
        return self.max_len

    def new_cache(self, slots: int, capacity: int) -> ExactCache:
        self.cache_capacity(capacity)
        p = next(self.hf.parameters())
        return ExactCache(len(self.layers), slots, self.n_kv, self.head_dim, self.max_len, p.dtype, p.device)

    @torch.no_grad()
    def prefill(self, ids, lengths, cache, slots):
        """Right-padded prompts ``ids [N, P]`` into ``slots``; logits at each prompt's last token."""
        N, P = ids.shape
        self._check_len(P)
        positions = torch.arange(P, device=ids.device)
        x = self.hf.model.embed_tokens(ids).reshape(N * P, -1)
        for li, layer in enumerate(self.layers):
            def attend(q, k, v, li=li):
                cache.k[li, slots, :, :P] = k.view(N, P, self.n_kv, -1).transpose(1, 2)
                cache.v[li, slots, :, :P] = v.view(N, P, self.n_kv, -1).transpose(1, 2)
                q = q.view(N, P, self.n_heads, -1).transpose(0, 1)
                pos = positions[:, None].expand(P, N)
                out = window_attend(q, *cache.layer(li), slots, pos, self.n_kv, self.scale)
                return out.transpose(0, 1).reshape(N * P, -1)

            x = self._layer(layer, x, positions.repeat(N), attend)
        cache.lengths[slots] = lengths
        return self.logits(x.view(N, P, -1)[torch.arange(N, device=ids.device), lengths - 1])

    @torch.no_grad()
    def decode(self, tokens, cache):
        """One token for each of the ``B`` running sequences in slots ``0..B-1``; ``[B, V]``."""
        B = tokens.shape[0]
        pos = cache.lengths[:B].clone()
        rows = torch.arange(B, device=tokens.device)
        x = self.hf.model.embed_tokens(tokens)
        for li, layer in enumerate(self.layers):
            def attend(q, k, v, li=li):
                cache.k[li, rows, :, pos] = k
                cache.v[li, rows, :, pos] = v
                return window_attend(q[None], *cache.layer(li), rows, pos[None], self.n_kv, self.scale)[0]

            x = self._layer(layer, x, pos, attend)
        cache.lengths[:B] = pos + 1
        return self.logits(x)

    def extend(self, *args, **kwargs):
        raise UserError("speculative decoding is not available with algorithm.true_on_policy")


class ExactLMForTraining(torch.nn.Module):
    """The trainer's forward in true on-policy mode (same interface as ``CausalLMForTraining``):
    the exact forward over right-padded rows, then log-probs as the engine's sampler computes them."""

    def __init__(self, lm: torch.nn.Module, max_len: int):
        super().__init__()
        self.lm = lm
        self.exact = ExactForward(lm, max_len)
        self.routing = None  # routing is bit-identical to the engine's by construction (no replay needed)

    def forward(self, batch, temperature: float = 1.0, entropy: str = "none"):
        if batch.packed:
            raise ValueError("the exact forward takes right-padded rows (train.packing is off in true on-policy mode)")
        hidden = self.exact.hidden(batch.input_ids)
        scored = batch.mask.bool()
        logits = self.exact.logits(hidden[scored])
        logp = exact_logprobs(logits, temperature, batch.targets[scored])
        out = torch.zeros(batch.mask.shape, dtype=torch.float32, device=hidden.device).masked_scatter(scored, logp)
        if entropy == "none":
            return out, None
        with torch.set_grad_enabled(entropy == "loss" and torch.is_grad_enabled()):
            logq = torch.log_softmax(logits / float(temperature), dim=-1)
            ent = -(logq.exp() * logq).sum(-1)
        return out, torch.zeros_like(out).masked_scatter(scored, ent)


def exact_logprobs(logits: torch.Tensor, temperature, targets: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``targets`` under softmax(logits / temperature), the same in engines (a
    per-row temperature tensor) and trainers (a float): row-chunked log_softmax."""
    temp = temperature.reshape(-1, 1).float() if torch.is_tensor(temperature) else torch.full(
        (logits.shape[0], 1), float(temperature), dtype=torch.float32, device=logits.device)
    logp = by_rows(lambda t: torch.log_softmax(t, dim=-1), logits / temp)
    return logp.gather(-1, targets[:, None]).squeeze(-1)
