"""Token log-probs (and entropy) through the LM head in chunks: memory-bounded.

The naive way, ``log_softmax(model(x).logits)``, materialises ``[tokens, vocab]`` fp32 logits for
the whole micro-batch (plus the softmax and their gradients): at vocab 151,936 and 8k tokens that
is ~5 GB. Here the decoder body runs once, the hidden states of the positions that are scored
(response tokens: ``batch.mask``) go through the LM head ``chunk_tokens`` at a time, and each
chunk is checkpointed (its logits are recomputed in backward), so at most one chunk's logits
exist at any moment. Values equal the naive computation (tested to 1e-5 in fp32).

Entropy: ``"loss"`` (with gradient, when ``entropy_coef > 0``), ``"log"`` (no gradient, for the
metric; one extra pass over each chunk's logits, no extra memory) or ``"none"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from miles_ray.training.batching import TokenBatch

ENTROPY_MODES = ("loss", "log", "none")


def _chunk(h, weight, bias, targets, temperature: float, entropy: str):
    logits = F.linear(h, weight, bias).float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if entropy == "none":
        return logp, None
    with torch.set_grad_enabled(entropy == "loss" and torch.is_grad_enabled()):
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, ent


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
                  chunk_tokens: int = 512, entropy: str = "none"):
    """``hidden [N, H]`` and ``targets [N]`` -> log-probs ``[N]`` of the targets under
    softmax(head(hidden) / temperature), and the entropy ``[N]`` (or None)."""
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy mode {entropy!r}: choose one of {ENTROPY_MODES}")
    logps, ents = [], []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[start:start + chunk_tokens], head.weight, head.bias, targets[start:start + chunk_tokens],
                temperature, entropy)
        logp, ent = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
        logps.append(logp)
        ents.append(ent)
    if not logps:  # nothing scored (fully masked): empty, but on the graph of every parameter involved
        empty = (hidden[:0].sum(-1) + 0.0 * head.weight.sum()).float()
        return empty, (empty if entropy != "none" else None)
    return torch.cat(logps), (torch.cat(ents) if entropy != "none" else None)


class CausalLMForTraining(torch.nn.Module):
    """What a trainer rank wraps with DDP / FSDP2: the transformers causal LM's decoder body, then
    :func:`head_logprobs` on the scored positions. ``forward(batch)`` returns per-token tensors
    shaped like ``batch.input_ids`` (0 where ``batch.mask`` is 0)."""

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int = 512, replay: bool = False):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        from miles_ray.models.moe import Routing

        routing = Routing(lm)
        self.routing = routing if routing.is_moe else None  # MoE: compare with (and R3: replay) rollout's experts
        self.replay = replay

    def forward(self, batch: TokenBatch, temperature: float = 1.0, entropy: str = "none"):
        if self.routing is not None:
            self.routing.set_reference(batch.flat_routing(), self.replay)
        hidden = self.lm.get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state
        if self.routing is not None:
            self.routing.stop_counting()
        scored = batch.mask.bool()
        logp, ent = head_logprobs(hidden[scored], self.lm.get_output_embeddings(), batch.targets[scored],
                                  temperature, self.chunk_tokens, entropy)
        out = torch.zeros(batch.mask.shape, dtype=torch.float32, device=hidden.device)
        out = out.masked_scatter(scored, logp)
        if ent is None:
            return out, None
        return out, torch.zeros_like(out).masked_scatter(scored, ent)


class ValueModelForTraining(torch.nn.Module):
    """The critic's counterpart: per-token values ``[R, L]`` (value before the next token)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, batch: TokenBatch):
        return self.lm(**batch.model_inputs()).logits[..., 0].float()


def naive_logprobs(model, batch: TokenBatch, temperature: float = 1.0):
    """Reference: full logits, then log_softmax (tests and the memory benchmark compare against it)."""
    logits = model(**batch.model_inputs(), use_cache=False).logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    return logp * batch.mask, logits
