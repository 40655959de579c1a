"""Pack samples (prompt_ids + response_ids) into padded tensors aligned with next-token logits.

For a sequence of length L, position t of the ``[B, L-1]`` per-token tensors scores token t+1.
``mask`` is 1 where that token is a response token. Per-token sample fields (old/ref log-probs,
advantages, values, returns) are scattered onto the response positions, 0 elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from miles_ray.algorithms.losses import entropy_from_logits

TOKEN_FIELDS = ("response_logprobs", "old_logprobs", "ref_logprobs", "advantages", "values", "returns")


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L-1] next tokens
    mask: torch.Tensor  # [B, L-1] float, 1 on response tokens
    fields: dict  # name -> [B, L-1] for each of TOKEN_FIELDS present on every sample

    def __getattr__(self, name):
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(name)


def pack(samples, pad_id: int = 0, device=None) -> PackedBatch:
    seqs = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    length = max(2, max(len(x) for x in seqs))
    B = len(samples)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    attention = torch.zeros((B, length), dtype=torch.long)
    mask = torch.zeros((B, length - 1))
    names = [f for f in TOKEN_FIELDS if all(getattr(s, f) for s in samples if s.response_ids)]
    fields = {f: torch.zeros((B, length - 1)) for f in names}
    for i, (s, seq) in enumerate(zip(samples, seqs)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        p, r = len(s.prompt_ids), len(s.response_ids)
        if r:
            mask[i, p - 1 : p - 1 + r] = 1.0
            for f in names:
                fields[f][i, p - 1 : p - 1 + r] = torch.tensor(getattr(s, f), dtype=torch.float32)
    if device is not None and str(device) != "cpu":
        input_ids, attention, mask = input_ids.to(device), attention.to(device), mask.to(device)
        fields = {k: v.to(device) for k, v in fields.items()}
    return PackedBatch(input_ids, attention, input_ids[:, 1:], mask, fields)


def forward_logits(model, batch: PackedBatch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.logits[:, :-1].float()


def token_logprobs(model, batch: PackedBatch, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs ``[B, L-1]`` of each next token under softmax(logits / temperature)
    (and the per-token entropy when ``with_entropy``)."""
    logits = forward_logits(model, batch) / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    if with_entropy:
        return logp, entropy_from_logits(logits)
    return logp


def unpack(values: torch.Tensor, batch: PackedBatch) -> list[list[float]]:
    """Per-sample lists of the response-token entries of a ``[B, L-1]`` tensor."""
    return [values[i][batch.mask[i].bool()].tolist() for i in range(values.shape[0])]


def split(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def make_minibatches(samples: list, n: int) -> list[list]:
    """``n`` contiguous mini-batches whose sizes differ by at most one."""
    n = max(1, min(n, len(samples)))
    q, r = divmod(len(samples), n)
    out, start = [], 0
    for k in range(n):
        end = start + q + (1 if k < r else 0)
        out.append(samples[start:end])
        start = end
    return out


def shard_minibatches(minibatches: list[list], world_size: int) -> list[list[list]]:
    """Per rank, its part of every global mini-batch: ``out[rank][k]`` (contiguous split)."""
    out = [[] for _ in range(world_size)]
    for mb in minibatches:
        for rank, part in enumerate(make_minibatches(mb, world_size) if len(mb) >= world_size
                                    else [mb[i:i + 1] for i in range(len(mb))] + [[]] * (world_size - len(mb))):
            out[rank].append(part)
    return out
