"""Training precision (``train.precision``), resolved once per trainer.

- ``fp32``: parameters, gradients, optimizer state and compute in fp32.
- ``bf16_mixed``: fp32 master parameters, bf16 compute, fp32 gradient reduction and optimizer
  state. DDP (or one rank): ``torch.autocast`` around the forward; FSDP2: its
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, params sharded in fp32.
- ``bf16``: everything in bf16 (updates below bf16 resolution vanish; kept for comparison).
- ``auto``: ``fp32`` if ``model.dtype`` is float32, else ``bf16_mixed``.
"""
from __future__ import annotations

import contextlib

import torch


def resolve(precision: str, model_dtype: str) -> str:
    """The compute precision (``fp8_unified`` computes as ``auto`` does, on fake-quantized linears)."""
    if precision in ("auto", "fp8_unified"):
        return "fp32" if model_dtype == "float32" else "bf16_mixed"
    return precision


def fake_quant(train_cfg) -> str | None:
    """The engines' quantization the trainer's linears reproduce (None: full precision)."""
    if getattr(train_cfg, "precision", "") == "fp8_unified":
        return "fp8"
    return "int4" if getattr(train_cfg, "qat", "none") == "int4" else None


def load_dtype(precision: str) -> str:
    """The dtype the trainer loads its parameters in (the master weights)."""
    return "bfloat16" if precision == "bf16" else "float32"


def autocast(precision: str, device: torch.device, fsdp: bool = False):
    """Forward-pass context: bf16 autocast for ``bf16_mixed`` outside FSDP2 (which casts itself)."""
    if precision != "bf16_mixed" or fsdp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def fsdp_policy(precision: str):
    """``fully_shard(..., mp_policy=...)`` argument for FSDP2 (None: no casting)."""
    if precision != "bf16_mixed":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
