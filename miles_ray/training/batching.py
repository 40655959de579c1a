"""Pack samples (prompt_ids + response_ids) into padded tensors aligned with next-token logits.

For a sequence of length L, position t of the ``[B, L-1]`` per-token tensors scores token t+1.
``mask`` is 1 where that token is a response token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L-1] next tokens
    mask: torch.Tensor  # [B, L-1] float, 1 on response tokens
    advantages: torch.Tensor  # [B, L-1] per-sample advantage broadcast on response tokens
    behaviour_logprobs: torch.Tensor  # [B, L-1] rollout log-probs on response tokens, 0 elsewhere


def pack(samples, pad_id: int = 0) -> PackedBatch:
    seqs = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    length = max(2, max(len(x) for x in seqs))
    B = len(samples)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    attention = torch.zeros((B, length), dtype=torch.long)
    mask = torch.zeros((B, length - 1))
    adv = torch.zeros((B, length - 1))
    behav = torch.zeros((B, length - 1))
    for i, (s, seq) in enumerate(zip(samples, seqs)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        p, r = len(s.prompt_ids), len(s.response_ids)
        if r:
            mask[i, p - 1 : p - 1 + r] = 1.0
            adv[i, p - 1 : p - 1 + r] = float(s.advantage)
            if s.response_logprobs:
                behav[i, p - 1 : p - 1 + r] = torch.tensor(s.response_logprobs, dtype=torch.float32)
    return PackedBatch(input_ids, attention, input_ids[:, 1:], mask, adv, behav)


def token_logprobs(model, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs ``[B, L-1]`` of each next token under softmax(logits / temperature)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)


def split(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
