"""What the megatron backend takes from ``train`` and ``megatron`` settings beyond the layout:
the precision and the activation recompute, as ``TransformerConfig`` fields.

- precision (``megatron.precision``, ``auto`` = ``train.precision`` resolved as the FSDP backend
  does, :func:`miles_ray.training.precision.resolve`): ``fp32`` or ``bf16_mixed`` (bf16 model,
  ``TransformerConfig(bf16=True, params_dtype=bf16)``; fp32 main parameters and gradients in the
  distributed optimizer, :mod:`.optimizer`). Anything else is refused at start (:mod:`.validate`).
- recompute (``train.gradient_checkpointing`` -> megatron's ``recompute_granularity``,
  ``transformer_config.py``): ``full`` = ``recompute_method="uniform"``, ``recompute_num_layers=1``
  (each layer's input is kept, its forward rerun in backward: ``TransformerBlock._checkpointed_forward``);
  ``selective`` = the core attention only (``recompute_modules=["core_attn"]``, megatron's default).
"""
from __future__ import annotations

import dataclasses

import torch

from miles_ray.training import precision as prec

SUPPORTED_PRECISIONS = ("fp32", "bf16_mixed")
RECOMPUTE = {
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
}


def resolve_precision(megatron_precision: str, train_precision: str, model_dtype: str) -> str:
    return megatron_precision if megatron_precision != "auto" else prec.resolve(train_precision, model_dtype)


def model_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16_mixed" else torch.float32


def with_recompute(config, gradient_checkpointing: bool, granularity: str = "full"):
    """``config`` with megatron's activation recompute on (``dataclasses.replace`` reruns
    ``TransformerConfig.__post_init__``, so megatron validates the combination)."""
    return dataclasses.replace(config, **RECOMPUTE[granularity]) if gradient_checkpointing else config
