"""Fixed-shape attention of the exact forward, read in place from a slot KV layout.

Layout (the engine's :class:`~miles_ray.models.kv_cache.SlotCache`, one layer): keys and values
``[S * n_kv, C, D]``, entry ``s * n_kv + g`` holding slot ``s``'s KV head ``g`` over ``C`` (=
``max_len``) positions; ``S * n_kv`` is a multiple of ``CHUNK`` (:class:`ExactCache` rounds the
slot count up) and the cache is allocated at a canonical address, so a window of ``CHUNK`` entries
is a plain view: the cache is written once (each token's K/V at its position) and never copied.

A round attends one query position per slot: every ``bmm`` call holds one window of ``CHUNK``
entries, each a ``[rep, D] x [D, C]`` product (the ``rep`` query heads sharing a KV head), then a
``[rep, C] x [C, D]`` product with the probabilities. A decode step is one round; a prefill or a
trainer row of ``L`` tokens is ``L`` rounds. Future and never-written keys are masked to -inf
(probability exactly 0), so each entry reduces over the same ``C`` keys in the same order whatever
the batch, the round or the slot. Memory: the layout (linear in ``C``) plus one window per call.

The trainer's backward (:class:`ExactAttention`) recomputes attention with stock SDPA (gradients
need no invariance; its CPU kernel is memory-efficient), so nothing quadratic is kept for backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from miles_ray.models.exact_ops import CHUNK, aligned_zeros, by_rows, softmax32
from miles_ray.models.kv_cache import SlotCache


def slot_multiple(n_kv: int) -> int:
    """Slot counts are multiples of this, so that ``slots * n_kv`` fills whole windows."""
    return CHUNK // math.gcd(CHUNK, n_kv)


def round_slots(slots: int, n_kv: int) -> int:
    m = slot_multiple(n_kv)
    return -(-slots // m) * m


class ExactCache(SlotCache):
    """A :class:`SlotCache` whose slot count fills whole windows (see the module doc)."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        super().__init__(layers, round_slots(slots, kv_heads), kv_heads, head_dim, capacity, dtype, device)

    def grown(self, slots: int, capacity: int) -> "ExactCache":
        L, S, H, C, D = self.k.shape
        new = ExactCache(L, max(S, slots), H, D, max(C, capacity), self.k.dtype, self.k.device)
        new.k[:, :S, :, :C] = self.k
        new.v[:, :S, :, :C] = self.v
        new.lengths[:S] = self.lengths
        return new

    def layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``li``'s keys and values as ``[S * n_kv, C, D]`` views."""
        L, S, H, C, D = self.k.shape
        return self.k[li].view(S * H, C, D), self.v[li].view(S * H, C, D)


def _plan(slots: torch.Tensor, n_kv: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per window: (window, indices into the ``[B * n_kv]`` entries, their places in the window)."""
    entries = (slots[:, None] * n_kv + torch.arange(n_kv, device=slots.device)).reshape(-1)
    plan = []
    for w in sorted(set((entries // CHUNK).tolist())):
        idx = (entries // CHUNK == w).nonzero().squeeze(1)
        plan.append((w, idx, entries[idx] % CHUNK))
    return plan


def _windowed(rows: torch.Tensor, table: torch.Tensor, plan, out_cols: int, transpose: bool) -> torch.Tensor:
    """``rows [E', rep, K]`` times each entry's matrix of ``table [E, C, D]`` (``^T`` if
    ``transpose``), one ``CHUNK``-entry window per call -> ``[E', rep, out_cols]``."""
    n, rep, k = rows.shape
    out = rows.new_empty(n, rep, out_cols)
    for w, idx, local in plan:
        a = aligned_zeros(CHUNK, rep * k, rows.dtype, rows.device).unflatten(1, (rep, k))
        a[local] = rows[idx]
        mats = table[w * CHUNK:(w + 1) * CHUNK]
        out[idx] = torch.bmm(a, mats.transpose(1, 2) if transpose else mats)[local]
    return out


@torch.no_grad()
def window_attend(q, keys, values, slots, pos, n_kv: int, scale: float) -> torch.Tensor:
    """``q [T, B, H, D]``: in round ``t`` row ``b`` (cache slot ``slots[b]``, distinct within a
    round) at position ``pos[t, b]`` attends keys ``0..pos``. ``keys/values [S * n_kv, C, D]``.
    Returns ``[T, B, H * D]``."""
    T, B, H, D = q.shape
    C = keys.shape[1]
    rep = H // n_kv
    plan = _plan(slots, n_kv)
    cols = torch.arange(C, device=q.device)
    out = []
    for t in range(T):
        scores = _windowed(q[t].reshape(B * n_kv, rep, D), keys, plan, C, True) * scale
        future = cols[None, :] > pos[t][:, None]  # [B, C]
        scores = scores.view(B, H, C).masked_fill(future[:, None, :], float("-inf"))
        probs = by_rows(softmax32, scores).to(values.dtype).view(B * n_kv, rep, C)
        out.append(_windowed(probs, values, plan, D, False).reshape(B, H * D))
    return torch.stack(out)


def slot_layout(x: torch.Tensor, slots: int, capacity: int) -> torch.Tensor:
    """Rows' ``x [R, L, n_kv, D]`` in the cache layout ``[slots * n_kv, capacity, D]`` (canonical)."""
    R, L, n_kv, D = x.shape
    buf = aligned_zeros(slots * n_kv, capacity * D, x.dtype, x.device).view(slots, n_kv, capacity, D)
    buf[:R, :, :L] = x.transpose(1, 2)
    return buf.view(slots * n_kv, capacity, D)


class ExactAttention(torch.autograd.Function):
    """Causal attention of right-padded rows ``q [R, L, H, D]``, ``k/v [R, L, n_kv, D]`` ->
    ``[R, L, H * D]``: forward by :func:`window_attend` over a scratch slot layout (the engine's
    numbers), backward by recomputing stock SDPA."""

    @staticmethod
    def forward(ctx, q, k, v, capacity: int, scale: float):
        R, L, H, D = q.shape
        n_kv = k.shape[2]
        S = round_slots(R, n_kv)
        keys, values = slot_layout(k, S, capacity), slot_layout(v, S, capacity)
        pos = torch.arange(L, device=q.device)[:, None].expand(L, R)
        out = window_attend(q.transpose(0, 1), keys, values, torch.arange(R, device=q.device), pos, n_kv, scale)
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return out.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        R, L, H, D = q.shape
        rep = H // k.shape[2]
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
            o = F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2).repeat_interleave(rep, 1),
                                               v_.transpose(1, 2).repeat_interleave(rep, 1), is_causal=True,
                                               scale=ctx.scale)
            gq, gk, gv = torch.autograd.grad(o.transpose(1, 2).reshape(R, L, H * D), (q_, k_, v_), grad)
        return gq, gk, gv, None, None
