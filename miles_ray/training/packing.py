"""How samples are split into micro-batches and across data-parallel ranks, by token count.

- :func:`karmarkar_karp`: the largest-differencing heuristic for k-way balanced partitions
  (Karmarkar & Karp 1982), as verl and slime use to balance sequence lengths across DP ranks.
- :func:`rank_parts`: a global mini-batch split across ranks with balanced token counts.
- :func:`plan_micro_batches`: one rank's samples in micro-batches: by count, by a token budget of
  padded tokens (padding counts), or packed rows of at most ``budget`` real tokens (balanced).

Every rank then runs the same number of micro-batches (``padded_micro_batches`` in
:mod:`miles_ray.training.base` adds zero-weight fillers), because DDP and FSDP2 sync inside them.
Order inside a part follows the input order, so results do not depend on the heuristic's ties.
"""
from __future__ import annotations

import heapq
import math


def karmarkar_karp(sizes: list[int], k: int) -> list[list[int]]:
    """Indices of ``sizes`` in ``k`` parts with near-equal sums (each part sorted)."""
    if k <= 0:
        raise ValueError("k must be positive")
    heap = []  # (-(max - min), tie, parts as [(sum, [indices])] sorted by sum descending)
    for i, size in enumerate(sizes):
        parts = [(size, [i])] + [(0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-size, i, parts))
    if not heap:
        return [[] for _ in range(k)]
    tie = len(sizes)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))]  # big with small
        merged.sort(key=lambda p: -p[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    return [sorted(ix) for _, ix in heap[0][2]]


def tokens(sample) -> int:
    return len(sample.prompt_ids) + len(sample.response_ids)


def rank_parts(samples: list, world_size: int) -> list[list[int]]:
    """Indices of ``samples`` in ``world_size`` parts of near-equal token counts (order kept)."""
    if world_size == 1:
        return [list(range(len(samples)))]
    parts = karmarkar_karp([tokens(s) for s in samples], world_size)
    for part in parts:  # every rank gets a sample when there are enough
        donor = max(parts, key=len)
        if not part and len(donor) > 1:
            part.append(donor.pop())
    return [sorted(p) for p in parts]


def plan_micro_batches(samples: list, micro_batch_size: int, budget: int = 0, packed: bool = False) -> list[list]:
    """Micro-batches of one rank, in order of first sample.

    - ``budget == 0``: ``micro_batch_size`` samples each.
    - padded: consecutive samples while (longest x count) <= ``budget``.
    - packed: the fewest balanced parts whose real tokens fit ``budget`` (a sample longer than the
      budget gets a part of its own).
    """
    if not samples:
        return []
    if budget <= 0:
        return [samples[i:i + micro_batch_size] for i in range(0, len(samples), micro_batch_size)]
    if not packed:
        return _padded_by_tokens(samples, budget)
    sizes = [tokens(s) for s in samples]
    fits = [i for i, n in enumerate(sizes) if n <= budget]
    alone = [[i] for i, n in enumerate(sizes) if n > budget]
    k = max(1, math.ceil(sum(sizes[i] for i in fits) / budget)) if fits else 0
    while fits:
        parts = [[fits[j] for j in p] for p in karmarkar_karp([sizes[i] for i in fits], k)]
        if max(sum(sizes[i] for i in p) for p in parts) <= budget or k >= len(fits):
            break
        k += 1
    groups = [p for p in (parts if fits else []) if p] + alone
    groups.sort(key=lambda p: p[0])
    return [[samples[i] for i in p] for p in groups]


def _padded_by_tokens(samples: list, budget: int) -> list[list]:
    out, cur, longest = [], [], 0
    for s in samples:
        n = tokens(s)
        if cur and max(longest, n) * (len(cur) + 1) > budget:
            out.append(cur)
            cur, longest = [], 0
        cur.append(s)
        longest = max(longest, n)
    return out + ([cur] if cur else [])
