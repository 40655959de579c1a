"""Speculative decoding for the native engine: a small draft model proposes ``k`` tokens for every
running sequence, the target scores all of them in one forward pass, and rejection sampling keeps
the output distribution exactly the target's (greedy rows: identical tokens).

The draft is a small *separate* causal LM sharing the target's tokenizer (by default the target's
first N layers with its embeddings and head, ``layers:N``; see :mod:`miles_ray.models.draft`), not
an EAGLE/MTP head: it trains from token ids alone (the rollouts the driver already holds), needs no
hidden states shipped from engines or trainers (whose features drift as RL trains the policy), is
synced with the same weight buckets as the policy, and maps onto SGLang's STANDALONE mode.

One round for the ``B`` running sequences (slots ``0..B-1`` in both caches):
  1. draft catch-up: the 1 or 2 tokens committed since the draft last saw a sequence, in one pass;
  2. the draft proposes ``d_1..d_k`` (k-1 more decode steps), keeping its distribution ``q_i``;
  3. the target scores ``[last, d_1..d_k]`` in one pass: ``p_1..p_{k+1}``;
  4. :func:`verify`: accept ``d_i`` while ``u_i q_i(d_i) < p_i(d_i)``; at the first rejection draw
     from ``norm(max(0, p_i - q_i))``; when all ``k`` pass, draw a bonus token from ``p_{k+1}``.
Cache invariants after a round (``seq`` = prompt + committed output): the target cache holds
``seq[:-1]`` (the last token is fed next round, as in plain decoding) and the draft cache holds a
prefix of ``seq`` at most two tokens short.
"""
from __future__ import annotations

import torch

from miles_ray.rollout.native.model import NativeForward
from miles_ray.rollout.native.sampling import distribution, draw


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator=None):
    """Rejection sampling. ``p [B, k+1, V]`` target distributions, ``q [B, k, V]`` the draft's,
    ``drafts [B, k]`` drawn from ``q``. Returns (accepted counts ``n [B]`` in 0..k, the token that
    follows the accepted drafts ``[B]``). Every emitted token follows the target's distribution."""
    B, k = drafts.shape
    pd = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, k, generator=generator, device=p.device, dtype=p.dtype)
    accept = u * qd < pd
    n = accept.long().cumprod(-1).sum(-1)
    rows = torch.arange(B, device=p.device)
    at = n.clamp(max=k - 1)
    residual = (p[rows, at] - q[rows, at]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, at])
    final = torch.where((n == k)[:, None], p[:, k], residual)
    return n, draw(final, generator)


class SpecStats:
    """Counters since the last :meth:`take`. ``accept_len`` = tokens emitted per sequence per target
    forward (1 + accepted drafts; plain decoding is 1)."""

    def __init__(self):
        self.proposed = self.accepted = self.rounds = self.emitted = 0

    def add(self, k: int, n: torch.Tensor, emitted: int) -> None:
        self.proposed += k * n.numel()
        self.accepted += int(n.sum())
        self.rounds += n.numel()
        self.emitted += emitted

    def take(self) -> dict:
        out = {"spec_accept_rate": self.accepted / max(self.proposed, 1),
               "spec_accept_len": self.emitted / max(self.rounds, 1), "spec_rounds": self.rounds}
        self.__init__()
        return out


class Speculator:
    """The draft side: its model, its slot cache (same slots as the target's) and the proposals."""

    def __init__(self, draft_model, k: int):
        if k < 1:
            raise ValueError(f"draft.num_tokens must be >= 1, got {k}")
        self.model, self.k = draft_model, k
        self.forward = NativeForward(draft_model)
        self.cache = None
        self.stats = SpecStats()

    def ensure_cache(self, slots: int, capacity: int) -> None:
        if self.cache is None:
            self.cache = self.forward.new_cache(slots, capacity)
        elif slots > self.cache.slots or capacity > self.cache.capacity:
            self.cache = self.cache.grown(slots, capacity)

    def prefill(self, ids, lengths, slots) -> None:
        self.forward.prefill(ids, lengths, self.cache, slots)

    def copy_slot(self, src: int, dst: int) -> None:
        self.cache.copy_slot(src, dst)

    def propose(self, seqs: list[list[int]], cols: tuple, generator):
        """Catch up on each sequence, then draft ``k`` tokens. Returns (drafts ``[B, k]``, their
        distributions ``q [B, k, V]``)."""
        B, dev = len(seqs), self.cache.k.device
        seen = self.cache.lengths[:B].tolist()
        pending = [s[n:] for s, n in zip(seqs, seen)]
        n_valid = torch.tensor([len(x) for x in pending], device=dev)
        tokens = torch.zeros(B, int(n_valid.max()), dtype=torch.long, device=dev)
        for i, x in enumerate(pending):
            tokens[i, : len(x)] = torch.tensor(x)
        logits = self.forward.extend(tokens, n_valid, self.cache)[torch.arange(B, device=dev), n_valid - 1]
        drafts, qs = [], []
        for i in range(self.k):
            q = distribution(logits, *cols)
            d = draw(q, generator)
            drafts.append(d)
            qs.append(q)
            if i < self.k - 1:
                logits = self.forward.decode(d, self.cache)
        return torch.stack(drafts, 1), torch.stack(qs, 1)

    def commit(self, seq_lens: list[int], n: torch.Tensor) -> None:
        """After verification: the draft keeps ``seq`` plus the drafts it fed that were accepted."""
        B = len(seq_lens)
        kept = torch.tensor(seq_lens, device=n.device) + n.clamp(max=self.k - 1)
        self.cache.lengths[:B] = kept

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """In-place copy of new draft weights (the cache stays valid only for unchanged weights, so
        callers load between rollouts or accept a stale draft cache: correctness never depends on
        the draft, only the acceptance rate does)."""
        params = dict(self.model.state_dict(keep_vars=True))
        missing = set(params) - set(state)
        if missing:
            raise ValueError(f"draft weights incomplete: missing {sorted(missing)[:5]}")
        for name, value in state.items():
            params[name].data.copy_(value.to(params[name].device, params[name].dtype))


def verify_logprobs(logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Target log-probs of ``tokens [B, T]`` under softmax(logits / temperature) (greedy rows: T=1),
    the convention :func:`~miles_ray.rollout.native.sampling.sample` uses."""
    temp = torch.where(temperature <= 0, torch.ones_like(temperature), temperature)[:, None, None]
    return torch.log_softmax(logits / temp, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
