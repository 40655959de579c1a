"""Vectorised sampling with per-row parameters: temperature (0 = greedy), top-k, top-p, min-p.

Returned log-probs are those of the chosen tokens under softmax(logits / temperature), before
truncation (the convention the trainer recomputes); greedy rows use temperature 1.
"""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, generator: torch.Generator | None = None):
    """``logits [B, V]`` and per-row parameter tensors ``[B]``. Returns (tokens [B], logprobs [B])."""
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    logp = torch.log_softmax(logits / temp, dim=-1)
    tokens = logits.argmax(-1)
    if not bool(greedy.all()):
        probs = logp.exp()
        if bool((top_k > 0).any() | (top_p < 1).any() | (min_p > 0).any()):
            probs = _truncate(probs, top_k, top_p, min_p)
        drawn = _inverse_cdf(probs, generator)
        tokens = torch.where(greedy, tokens, drawn)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def distribution(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """The normalised distribution :func:`sample` draws from, ``[B, V]``: one-hot at the argmax for
    greedy rows, else softmax(logits / temperature) truncated by top-k / top-p / min-p."""
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    probs = torch.softmax(logits / temp, dim=-1)
    if bool((top_k > 0).any() | (top_p < 1).any() | (min_p > 0).any()):
        probs = _truncate(probs, top_k, top_p, min_p)
        probs = probs / probs.sum(-1, keepdim=True)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from (possibly unnormalised) ``probs [B, V]``."""
    return _inverse_cdf(probs, generator)


def _inverse_cdf(probs: torch.Tensor, generator) -> torch.Tensor:
    """One uniform draw per row against the running sum of (unnormalised) probabilities: exact
    categorical sampling at the cost of a cumsum (``torch.multinomial`` draws one exponential per
    vocabulary entry, a quarter of a CPU decode step at vocab 49k)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def _truncate(probs, top_k, top_p, min_p):
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    drop |= (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]  # keep the smallest set reaching top_p
    drop |= sorted_p < (min_p[:, None] * sorted_p[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)
