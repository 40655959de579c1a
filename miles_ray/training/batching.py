"""Lay samples (prompt_ids + response_ids) out as token tensors for one forward pass.

Two layouts, one convention (:class:`TokenBatch`):

- padded: one row per sample, right-padded to the longest; positions 0..len-1.
- packed (``train.packing``): samples concatenated into one row, positions restarting at 0 for
  each sample; attention is confined to each sample by the varlen attention of
  :mod:`miles_ray.training.fsdp.varlen` (``seqlens``), so no token sees another sample.

In both, every per-token tensor has the shape of ``input_ids`` and position t holds what scores
the *next* token of the same sample (``targets[t]``). ``mask`` is 1 where that next token is a
response token. Per-token sample fields (behaviour/old/ref log-probs, advantages, values, returns)
are scattered onto those positions, 0 elsewhere.

Losses work per sample (sequence-level ratios and aggregations need sequences as rows):
:meth:`TokenBatch.by_sample` gathers a per-token tensor into ``[samples, longest response]``
(``sample_mask`` marks the real entries), the same for both layouts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

TOKEN_FIELDS = ("response_logprobs", "old_logprobs", "ref_logprobs", "advantages", "values", "returns")


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    targets: torch.Tensor  # [R, L] next token of the same sample (0 where there is none)
    mask: torch.Tensor  # [R, L] float, 1 where the next token is a response token
    fields: dict = field(default_factory=dict)  # name -> [R, L] for each of TOKEN_FIELDS present
    spans: list = field(default_factory=list)  # per sample: (row, first response-scoring position, count)
    seqlens: list | None = None  # packed: lengths of the samples in the (single) row; None: padded rows
    resp_index: torch.Tensor | None = None  # [S, Rmax] flat positions of each sample's response tokens
    sample_mask: torch.Tensor | None = None  # [S, Rmax] 1 on real entries
    routing: torch.Tensor | None = None  # MoE: [R, L, layers, k] experts the engine used, -1 where unknown

    def __getattr__(self, name):
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(name)

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                          self.mask.to(device), {k: v.to(device) for k, v in self.fields.items()}, self.spans,
                          self.seqlens, self.resp_index.to(device), self.sample_mask.to(device),
                          self.routing.to(device) if self.routing is not None else None)

    def flat_routing(self) -> torch.Tensor | None:
        """The routing of every position in the forward's flattened token order."""
        return None if self.routing is None else self.routing.reshape(-1, *self.routing.shape[2:])

    def by_sample(self, x: torch.Tensor) -> torch.Tensor:
        """A per-token tensor (``[R, L]``) as ``[samples, longest response]``, 0 off ``sample_mask``."""
        return x.reshape(-1)[self.resp_index] * self.sample_mask

    def sample_field(self, name: str) -> torch.Tensor:
        return self.by_sample(self.fields[name])

    @property
    def packed(self) -> bool:
        return self.seqlens is not None

    def model_inputs(self) -> dict:
        """Keyword arguments for a transformers model: right padding needs no mask under causal
        attention (real tokens never look right); packed rows carry the sample lengths."""
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.packed:
            out["cu_seq_lens_q"] = torch.tensor([0, *torch.tensor(self.seqlens).cumsum(0).tolist()],
                                                dtype=torch.int32, device=self.input_ids.device)
        return out


def _layout(samples, packed: bool) -> list[tuple[int, int]]:
    """(row, offset) of each sample."""
    if not packed:
        return [(i, 0) for i in range(len(samples))]
    out, offset = [], 0
    for s in samples:
        out.append((0, offset))
        offset += len(s.prompt_ids) + len(s.response_ids)
    return out


def pack(samples, pad_id: int = 0, device=None, packed: bool = False, length_multiple: int = 1) -> TokenBatch:
    """A :class:`TokenBatch` of ``samples`` (packed into one row when ``packed``); the row length is
    padded up to a multiple of ``length_multiple`` (sequence parallelism shards it)."""
    seqs = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    where = _layout(samples, packed)
    rows = 1 if packed else len(samples)
    length = max(2, sum(map(len, seqs)) if packed else max(len(x) for x in seqs))
    length = -(-length // length_multiple) * length_multiple
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, length), dtype=torch.long)
    targets = torch.zeros((rows, length), dtype=torch.long)
    mask = torch.zeros((rows, length))
    names = [f for f in TOKEN_FIELDS if all(getattr(s, f) for s in samples if s.response_ids)]
    fields = {f: torch.zeros((rows, length)) for f in names}
    spans = []
    for s, seq, (row, off) in zip(samples, seqs, where):
        n, p, r = len(seq), len(s.prompt_ids), len(s.response_ids)
        input_ids[row, off:off + n] = torch.tensor(seq, dtype=torch.long)
        position_ids[row, off:off + n] = torch.arange(n)
        targets[row, off:off + n - 1] = input_ids[row, off + 1:off + n]
        start = off + p - 1  # this position scores the first response token
        spans.append((row, start, r))
        if r:
            mask[row, start:start + r] = _loss_mask(s)
            for f in names:
                fields[f][row, start:start + r] = torch.tensor(getattr(s, f), dtype=torch.float32)
    if not packed:  # padding positions keep counting (harmless: they are never attended to)
        position_ids = torch.arange(length).expand(rows, length).clone()
    longest = max([r for _, _, r in spans] + [1])
    resp_index = torch.zeros((len(samples), longest), dtype=torch.long)
    sample_mask = torch.zeros((len(samples), longest))
    for i, (row, start, r) in enumerate(spans):
        resp_index[i, :r] = row * length + start + torch.arange(r)
        sample_mask[i, :r] = mask[row, start:start + r]
    batch = TokenBatch(input_ids, position_ids, targets, mask, fields, spans, [len(x) for x in seqs] if packed else None,
                       resp_index, sample_mask, _routing(samples, where, rows, length))
    return batch.to(device) if device is not None and str(device) != "cpu" else batch


def _loss_mask(s) -> torch.Tensor:
    """1 on the response tokens the policy is trained on: all of them, or a multi-turn sample's
    model tokens (``Sample.loss_mask``; tool and environment tokens are context only)."""
    if s.loss_mask is None:
        return torch.ones(len(s.response_ids))
    if len(s.loss_mask) != len(s.response_ids):
        raise ValueError(f"sample of group {s.group_id}: loss_mask has {len(s.loss_mask)} entries for "
                         f"{len(s.response_ids)} response tokens")
    return torch.tensor(s.loss_mask, dtype=torch.float32)


def _routing(samples, where, rows: int, length: int) -> torch.Tensor | None:
    """MoE routing traces of the samples laid out like the tokens (-1 where none was recorded)."""
    traces = [s.routed_experts for s in samples]
    if not any(traces):
        return None
    from miles_ray.models.moe import decode

    shape = next(t for t in traces if t)["shape"][1:]
    out = torch.full((rows, length, *shape), -1, dtype=torch.long)
    for trace, (row, off) in zip(traces, where):
        if trace:
            ids = decode(trace)
            out[row, off:off + ids.shape[0]] = ids
    return out


def unpack(values: torch.Tensor, batch: TokenBatch) -> list[list[float]]:
    """Per-sample lists of the response-token entries of a per-token tensor."""
    host = values.detach().float().cpu()
    return [host[row, start:start + r].tolist() for row, start, r in batch.spans]


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


def loss_tokens(samples) -> float:
    """Response tokens the loss is taken over (a multi-turn sample's model tokens only)."""
    return float(sum(len(s.response_ids) if s.loss_mask is None else sum(s.loss_mask) for s in samples))
