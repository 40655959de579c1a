"""Forward of a megatron ``GPTModel`` stage on a :class:`~miles_ray.training.batching.TokenBatch`,
and token log-probs / entropy from the *vocab-parallel* logits.

- Attention mask: an explicit boolean causal mask (True = masked) for padded rows; passing it also
  keeps megatron from building its default causal mask with a hard-coded ``device="cuda"``. A
  packed row goes in as THD with ``PackedSeqParams`` instead (:mod:`.packed`);
  :func:`attention_mask` also gives the block-diagonal mask of a packed row (a reference).
- Log-probs: ``log p(target) = logit[target] - logsumexp(logits)`` with the max, the sum of
  exponentials and the target logit all-reduced over the TP group
  (``tensor_parallel.vocab_parallel_cross_entropy``); the full vocab never sits on one rank.
- Entropy: ``log S + m - sum(e * l) / S`` with both sums reduced over TP
  (``reduce_from_tensor_model_parallel_region``: identity backward, correct because the loss is
  computed identically on every TP rank).
"""
from __future__ import annotations

import contextlib

import torch

from miles_ray.training import collectives


def attention_mask(batch) -> torch.Tensor:
    """``[1, 1, L, L]`` bool, True where a query may *not* attend to a key."""
    length = batch.input_ids.shape[1]
    device = batch.input_ids.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    if not batch.packed:
        return causal[None, None]
    sample = torch.repeat_interleave(torch.arange(len(batch.seqlens), device=device),
                                     torch.tensor(batch.seqlens, device=device))
    sample = torch.cat([sample, torch.full((length - sample.numel(),), -1, device=device)])
    return (causal | (sample[:, None] != sample[None, :]))[None, None]


@contextlib.contextmanager
def returning_hidden(model):
    """While active, ``model`` (a last stage) returns its final hidden states ``[s, b, h]``
    (``GPTModel._postprocess``: ``if not self.post_process: return hidden_states``,
    ``gpt_model.py`` line 608)."""
    post = model.post_process
    model.post_process = False
    try:
        yield model
    finally:
        model.post_process = post


def stage_forward(model, batch, hidden: bool = False) -> torch.Tensor:
    """This stage's output: logits ``[R, L, V/tp]`` on the last stage (``hidden``: its final hidden
    states ``[L(/tp), R, h]`` instead, for :mod:`.logprobs`), hidden states otherwise (the input of a
    non-first stage comes from ``model.set_input_tensor``). Packed rows go in as THD
    (:mod:`.packed`), without a mask."""
    from miles_ray.training.megatron.packed import packed_seq_params

    params = packed_seq_params(batch)
    mask = None if params is not None else attention_mask(batch)
    with returning_hidden(model) if hidden and model.post_process else contextlib.nullcontext():
        return model(batch.input_ids, batch.position_ids, mask, packed_seq_params=params)


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                            entropy: bool = False):
    """``logits [R, L, V/tp]`` -> (log-probs ``[R, L]``, entropy ``[R, L]`` or None)."""
    from megatron.core import tensor_parallel

    scaled = logits.float() / temperature
    ent = vocab_parallel_entropy(scaled) if entropy else None
    logp = -tensor_parallel.vocab_parallel_cross_entropy(scaled.clone(), targets)  # it works in place
    return logp, ent


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    top = logits.detach().max(dim=-1, keepdim=True).values
    collectives.all_reduce_(top, "max", group=ps.get_tensor_model_parallel_group())
    shifted = logits - top
    exp = shifted.exp()
    sums = reduce_from_tensor_model_parallel_region(torch.stack([exp.sum(-1), (exp * shifted).sum(-1)]))
    return sums[0].log() - sums[1] / sums[0]
