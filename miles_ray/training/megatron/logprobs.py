"""Token log-probs and entropy of the megatron backend through the vocab-parallel output layer in
chunks: never a whole ``[tokens, vocab/tp]`` fp32 logits tensor.

The last stage returns its final hidden states instead of logits (:func:`~miles_ray.training.megatron.forward.returning_hidden`:
megatron's ``GPTModel._postprocess`` returns them when ``post_process`` is false,
``gpt_model.py`` line 608); :func:`head_logprobs` then takes the scored positions
(``batch.mask``) ``chunk_tokens`` at a time through the output weight, each chunk under
``torch.utils.checkpoint`` (its logits are recomputed in backward), as the FSDP backend's
``training/fsdp/logprobs.py`` does. Per chunk, the TP math of :mod:`.forward`:
``tensor_parallel.vocab_parallel_cross_entropy`` and the TP-reduced entropy sums.

The input side reproduces ``ColumnParallelLinear`` (``tensor_parallel/layers.py``): under sequence
parallelism the sequence shards are all-gathered (``gather_from_sequence_parallel_region``,
reduce-scatter in backward), otherwise the input's gradient is all-reduced over TP
(``copy_to_tensor_model_parallel_region``). Every TP rank runs the same chunks in the same order,
so the collectives inside the recomputation match up. Values and gradients equal the unchunked
computation (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from miles_ray.training.megatron.forward import vocab_parallel_entropy


def output_weight(model) -> torch.Tensor:
    """The vocab-parallel output weight ``[V/tp, h]`` (the embedding when tied)."""
    return model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else model.output_layer.weight


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: megatron's ``_reduce``
    (``tensor_parallel/mappings.py`` line 31) all-reduces ``grad.contiguous()`` and returns the
    original, so a non-contiguous gradient (ours comes through a transpose) would go back unreduced."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _full_sequence(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    gathered = gather_from_sequence_parallel_region(hidden) if sequence_parallel \
        else copy_to_tensor_model_parallel_region(hidden)
    return _ContiguousGrad.apply(gathered)


def _chunk(h, weight, targets, temperature: float, entropy: str):
    from megatron.core import tensor_parallel

    logits = F.linear(h, weight).float() / temperature
    ent = None
    if entropy != "none":
        with torch.set_grad_enabled(entropy == "loss" and torch.is_grad_enabled()):
            ent = vocab_parallel_entropy(logits)
    logp = -tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), targets)  # it works in place
    return logp, ent


def head_logprobs(model, hidden: torch.Tensor, batch, temperature: float, chunk_tokens: int, entropy: str,
                  sequence_parallel: bool):
    """``hidden [s(/tp), b, h]`` of the last stage -> (log-probs ``[b, s]``, entropy ``[b, s]`` or
    None), 0 off ``batch.mask``. ``entropy``: ``"loss"`` (with gradient), ``"log"`` or ``"none"``."""
    full = _full_sequence(hidden, sequence_parallel)  # [s, b, h]
    flat = full.transpose(0, 1).reshape(-1, full.shape[-1])
    scored = batch.mask.reshape(-1).bool()
    index = scored.nonzero().squeeze(1)
    h, targets, weight = flat[index], batch.targets.reshape(-1)[index], output_weight(model)
    grad = torch.is_grad_enabled()
    logps, ents = [], []
    for start in range(0, h.shape[0], chunk_tokens):
        args = (h[start:start + chunk_tokens], weight, targets[start:start + chunk_tokens], temperature, entropy)
        logp, ent = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
        logps.append(logp)
        ents.append(ent)
    anchor = 0.0 * full.sum()  # keeps the output on the graph when nothing is scored
    out = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device)
    logp = out.index_put((index,), torch.cat(logps) if logps else out[:0]) + anchor
    shape = batch.mask.shape
    if entropy == "none":
        return logp.view(shape), None
    ent = torch.zeros_like(out).index_put((index,), torch.cat(ents) if ents else out[:0])
    return logp.view(shape), ent.view(shape)
