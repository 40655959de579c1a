"""The row-invariant ("exact") forward behind ``algorithm.true_on_policy``.

Engines and trainers must produce bit-identical log-probs for every sampled token, although the
engine decodes one token per step against a KV cache and the trainer runs whole sequences. Every
op here computes a token's numbers with the same kernel calls whatever else is in the batch:

- products (projections, MLPs, experts, router, LM head, attention scores and values): one
  ``[1, K] x [K, N]`` product per row (``torch.bmm`` with the weight broadcast with stride 0:
  nothing is copied), and every ``bmm`` call holds exactly ``CHUNK`` rows (the last call padded
  with zeros), so neither a row's reduction order nor the library's kernel choice depends on how
  many rows there are (plain ``F.linear`` picks its kernel by the row count: on this CPU fp32 rows
  differ for M < 12; cuBLAS picks batched-GEMM algorithms by batch count);
- attention: every query row attends over keys padded to one fixed length ``max_len`` (future and
  padding keys are masked to -inf: their probabilities are exactly 0, so what the cache holds there
  never counts): decode and a full forward reduce in the same order;
- row reductions (RMSNorm, softmax, log-softmax) also run on exactly ``CHUNK`` rows per call
  (:func:`by_rows`);
  RoPE, activations and residuals are element-wise.
- MoE: router logits by row, softmax in fp32, top-k, each selected expert by row, the weighted sum
  in top-k order.

Gradients flow (the trainer trains through it); backward uses ordinary matmuls (they need no
invariance). Cost: several times slower than the stock forward (see docs); tiny and small models.
:func:`self_test` checks decode == full forward and batch invariance on probes at startup;
``true_on_policy`` is refused where it fails.
"""
from __future__ import annotations

import torch

from miles_ray.errors import UserError

CHUNK = 64  # rows in every batched call of the exact forward (fixed: kernels never see another shape)


def fixed_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` in calls of exactly ``CHUNK`` batch entries (zero padding; a ``b``
    broadcast with batch stride 0 stays broadcast)."""
    n = a.shape[0]
    pad = -n % CHUNK
    broadcast = b.stride(0) == 0
    a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])]) if pad else a.contiguous()  # one memory layout always:
    if not broadcast:  # the library's kernel path depends on operand strides too
        b = torch.cat([b, b.new_zeros(pad, *b.shape[1:])]) if pad else b.contiguous()
    parts = [torch.bmm(a[i:i + CHUNK], b[:1].expand(CHUNK, -1, -1) if broadcast else b[i:i + CHUNK])
             for i in range(0, n + pad, CHUNK)]
    return torch.cat(parts)[:n]


def by_rows(fn, x: torch.Tensor) -> torch.Tensor:
    """A row-wise ``fn`` (over the last dim) applied in calls of exactly ``CHUNK`` rows."""
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    pad = -n % CHUNK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[-1])])
    out = torch.cat([fn(flat[i:i + CHUNK]) for i in range(0, n + pad, CHUNK)])[:n]
    return out.reshape(*x.shape[:-1], out.shape[-1])


class _RowLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return fixed_bmm(x.unsqueeze(1), weight.t().unsqueeze(0).expand(x.shape[0], -1, -1)).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad @ weight, grad.t() @ x


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` computed row by row (row-invariant); ``x [..., K]``."""
    out = _RowLinear.apply(x.reshape(-1, x.shape[-1]), weight)
    out = out + bias if bias is not None else out
    return out.reshape(*x.shape[:-1], weight.shape[0])


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

    # -- pieces ---------------------------------------------------------------------------------
    def _qkv(self, attn, h, positions):
        """``h [N, d]`` at absolute ``positions [N]`` -> q ``[N, H, D]``, k and v ``[N, H_kv, D]``."""
        N = h.shape[0]
        q = _lin(attn.q_proj, h).view(N, self.n_heads, self.head_dim)
        k = _lin(attn.k_proj, h).view(N, self.n_kv, self.head_dim)
        v = _lin(attn.v_proj, h).view(N, self.n_kv, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = by_rows(attn.q_norm, q), by_rows(attn.k_norm, k)
        cos, sin = self.hf.model.rotary_emb(h, positions[None])
        return _rope(q, cos[0], sin[0]), _rope(k, cos[0], sin[0]), v

    def _attend(self, q, keys, values, positions):
        """``q [N, H, D]``; ``keys/values [N, H_kv, max_len, D]`` (each query row's own); causal at
        ``positions [N]``. Returns ``[N, H * D]``."""
        N, H, D = q.shape
        rep = H // self.n_kv
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        scores = fixed_bmm(q.reshape(N * H, 1, D), keys.reshape(N * H, -1, D).transpose(1, 2)) * self.scale
        future = torch.arange(self.max_len, device=q.device)[None, :] > positions[:, None]  # [N, max_len]
        scores = scores.view(N, H, self.max_len).masked_fill(future[:, None, :], float("-inf"))
        probs = by_rows(lambda t: torch.softmax(t.float(), dim=-1), scores).to(values.dtype)
        out = fixed_bmm(probs.reshape(N * H, 1, self.max_len), values.reshape(N * H, self.max_len, D))
        return out.reshape(N, H * D)

    def _mlp(self, mlp, h):
        if hasattr(mlp, "experts"):
            return self._moe(mlp, h)
        return _lin(mlp.down_proj, mlp.act_fn(_lin(mlp.gate_proj, h)) * _lin(mlp.up_proj, h))

    def _moe(self, block, h):
        router, experts = block.gate, block.experts
        probs = by_rows(lambda t: torch.softmax(t.float(), dim=-1), row_linear(h, router.weight))
        weights, index = torch.topk(probs, router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for slot in range(router.top_k):  # fixed order: the weighted sum reduces identically everywhere
            e = index[:, slot]
            gate_up = fixed_bmm(h.unsqueeze(1), experts.gate_up_proj[e].transpose(1, 2)).squeeze(1)
            gate, up = gate_up.chunk(2, dim=-1)
            y = fixed_bmm((experts.act_fn(gate) * up).unsqueeze(1), experts.down_proj[e].transpose(1, 2)).squeeze(1)
            out = out + y * weights[:, slot, None].to(y.dtype)
        return out

    def logits(self, x):
        """Final norm, then the LM head row by row, in fp32."""
        return _lin(self.hf.lm_head, by_rows(self.hf.model.norm, x)).float()

    # -- whole sequences (trainer) --------------------------------------------------------------
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Right-padded rows ``ids [R, L]`` -> last hidden states ``[R, L, d]``: the engine's
        prefill code on a scratch cache (gradients flow through the cache writes)."""
        cache = self.new_cache(ids.shape[0], self.max_len)
        return self.hidden_with_cache(ids, cache, torch.arange(ids.shape[0], device=ids.device))

    # -- engine interface (NativeForward's) -----------------------------------------------------
    def cache_capacity(self, needed: int, current: int = 0) -> int:
        """Always ``max_len`` (the attention's fixed key length); more is an error."""
        if needed > self.max_len:
            raise UserError(f"a request needs {needed} positions; true on-policy mode holds at most max_len="
                            f"{self.max_len} (raise algorithm.true_on_policy_max_len, or lower data.max_prompt_tokens / "
                            "rollout.max_new_tokens)")
        return self.max_len

    def new_cache(self, slots: int, capacity: int):
        from miles_ray.models.kv_cache import SlotCache

        self.cache_capacity(capacity)
        p = next(self.hf.parameters())
        return SlotCache(len(self.layers), slots, self.n_kv, self.head_dim, self.max_len, p.dtype, p.device)

    @torch.no_grad()
    def prefill(self, ids, lengths, cache, slots):
        """Right-padded prompts into ``slots``; logits at each prompt's last token ``[N, V]``."""
        N, P = ids.shape
        x = self.hidden_with_cache(ids, cache, slots)
        cache.lengths[slots] = lengths
        return self.logits(x[torch.arange(N, device=ids.device), lengths - 1])

    def hidden_with_cache(self, ids, cache, slots):
        """Right-padded rows ``ids [R, L]`` through every layer, each row's K/V written into its
        cache slot and attended from there (keys beyond L: whatever the slot holds, masked)."""
        R, L = ids.shape
        if L > self.max_len:
            raise ValueError(f"a sequence of {L} tokens exceeds the exact forward's max_len={self.max_len}")
        positions = torch.arange(L, device=ids.device).repeat(R)
        x = self.hf.model.embed_tokens(ids).reshape(R * L, -1)
        row = torch.arange(R, device=ids.device).repeat_interleave(L)
        for li, layer in enumerate(self.layers):
            h = by_rows(layer.input_layernorm, x)
            q, k, v = self._qkv(layer.self_attn, h, positions)
            cache.k[li, slots, :, :L] = k.view(R, L, self.n_kv, -1).transpose(1, 2)
            cache.v[li, slots, :, :L] = v.view(R, L, self.n_kv, -1).transpose(1, 2)
            keys, values = cache.k[li, slots][row], cache.v[li, slots][row]
            x = x + _lin(layer.self_attn.o_proj, self._attend(q, keys, values, positions))
            x = x + self._mlp(layer.mlp, by_rows(layer.post_attention_layernorm, x))
        return x.view(R, L, -1)

    @torch.no_grad()
    def decode(self, tokens, cache):
        """One token for each of the ``B`` running sequences in slots ``0..B-1``; ``[B, V]``."""
        B = tokens.shape[0]
        pos = cache.lengths[:B].clone()
        rows = torch.arange(B, device=tokens.device)
        x = self.hf.model.embed_tokens(tokens)
        for li, layer in enumerate(self.layers):
            h = by_rows(layer.input_layernorm, x)
            q, k, v = self._qkv(layer.self_attn, h, pos)
            cache.k[li, rows, :, pos] = k
            cache.v[li, rows, :, pos] = v
            x = x + _lin(layer.self_attn.o_proj, self._attend(q, cache.k[li, :B], cache.v[li, :B], pos))
            x = x + self._mlp(layer.mlp, by_rows(layer.post_attention_layernorm, x))
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


@torch.no_grad()
def self_test(forward: ExactForward, vocab_size: int, length: int = 16, seed: int = 0) -> None:
    """Decode == full forward (bit for bit) and batch invariance, on probe sequences; raises a
    :class:`UserError` naming the first difference (true on-policy is then refused)."""
    device = next(forward.hf.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    probes = torch.randint(3, vocab_size, (4, length), generator=gen).to(device)  # 4 x 16 rows: a whole chunk
    full = forward.logits(forward.hidden(probes))  # [4, L, V]
    cache = forward.new_cache(4, forward.max_len)
    forward.prefill(probes[:, :4], torch.full((4,), 4, device=device), cache, torch.arange(4, device=device))
    for t in range(4, length):
        step = forward.decode(probes[:, t], cache)  # 4 rows at once
        if not torch.equal(step, full[:, t]):
            diff = (step - full[:, t]).abs().max().item()
            raise UserError(f"algorithm.true_on_policy: the startup self-test found decode logits differing from the full "
                            f"forward at position {t} by {diff:.3g} on this machine ({device}); true on-policy is "
                            "refused here (set algorithm.true_on_policy=false)")
    alone = forward.logits(forward.hidden(probes[:1]))
    if not torch.equal(alone, full[:1]):
        raise UserError("algorithm.true_on_policy: the startup self-test found the full forward of one sequence differing "
                        f"from the same sequence in a batch of 4 on this machine ({device}); true on-policy is refused")
