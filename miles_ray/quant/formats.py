"""Quantization formats, pure tensor functions (no model knowledge).

- FP8 e4m3 (``torch.float8_e4m3fn``, max 448), DeepSeek-V3 style: weights in 128 x 128 blocks with
  one fp32 scale each, activations in 1 x 128 groups (per token, per 128 channels), scale =
  amax / 448 (a zero block gets scale 1).
- INT4 symmetric groups of 128 along the input dimension, as compressed-tensors quantizes
  (``quantization/utils/helpers.py::calculate_qparams``: scale = absmax / (15 / 2), kept in the
  model's 16-bit dtype; ``lifecycle/forward.py``: q = round(clamp(w / scale, -8, 7))); in transit
  packed two per byte (low nibble = even column, stored as q + 8).

``qdq_*`` quantize then dequantize: the exact values an engine computes with after receiving the
quantized tensors (dequantize-then-matmul on CPU).
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128  # FP8 weight blocks are BLOCK x BLOCK, activation groups 1 x BLOCK
GROUP = 128  # INT4 group size along the input dimension


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dims of ``x`` up to multiples of ``rows`` x ``cols``."""
    pr, pc = -x.shape[-2] % rows, -x.shape[-1] % cols
    return torch.nn.functional.pad(x, (0, pc, 0, pr)) if pr or pc else x


def fp8_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` -> (``q [..., N, K]`` fp8, ``scale [..., ceil(N/128), ceil(K/128)]`` fp32);
    leading dims (a fused MoE experts tensor ``[E, N, K]``) are independent matrices."""
    *lead, N, K = w.shape
    x = _pad_to(w.float(), BLOCK, BLOCK)
    blocks = x.view(*lead, x.shape[-2] // BLOCK, BLOCK, x.shape[-1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(x.shape)[..., :N, :K].contiguous(), scale


def fp8_dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    N, K = q.shape[-2:]
    full = scale.repeat_interleave(BLOCK, -2)[..., :N, :].repeat_interleave(BLOCK, -1)[..., :K]
    return (q.float() * full).to(dtype)


def fp8_quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (K a multiple of 128) -> (``q [M, K]`` fp8, ``scale [M, K/128]`` fp32): the
    operands of an FP8 GEMM kernel (DeepGEMM's / torch's 1 x 128 activation scaling)."""
    M, K = x.shape
    groups = x.float().view(M, K // BLOCK, BLOCK)
    amax = groups.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(M, K), scale


def fp8_qdq_activation(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x [..., K]`` in 1 x 128 groups (per token); same dtype back."""
    K = x.shape[-1]
    flat = x.reshape(-1, K).float()
    flat = torch.nn.functional.pad(flat, (0, -K % BLOCK)) if K % BLOCK else flat
    groups = flat.view(flat.shape[0], -1, BLOCK)
    amax = groups.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    out = (groups / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
    return out.view(flat.shape)[:, :K].reshape(x.shape).to(x.dtype)


def int4_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` (K a multiple of 128) -> (``q [..., N, K]`` int8 in [-8, 7], ``scale
    [..., N, K/128]`` bf16); leading dims are independent matrices (fused MoE experts)."""
    *lead, N, K = w.shape
    if K % GROUP:
        raise ValueError(f"INT4 groups of {GROUP} need in_features divisible by {GROUP}, got {K}")
    groups = w.float().view(*lead, N, K // GROUP, GROUP)
    amax = groups.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 7.5, torch.ones_like(amax)).to(torch.bfloat16)
    q = torch.round((groups / scale.float()[..., None]).clamp(-8, 7)).to(torch.int8)
    return q.view(w.shape), scale


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    *lead, N, K = q.shape
    return (q.view(*lead, N, K // GROUP, GROUP).float() * scale[..., None].float()).view(q.shape).to(dtype)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], ``[..., K]`` -> uint8 ``[..., K/2]``: (q + 8) of column 2j in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).view(*packed.shape[:-1], packed.shape[-1] * 2)


def qdq_weight(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """The dequantized weight an engine serves for ``scheme`` (fp8 or int4), in ``w``'s dtype
    (``[N, K]``, or ``[E, N, K]``: each expert matrix on its own)."""
    if scheme == "fp8":
        return fp8_dequantize_weight(*fp8_quantize_weight(w), dtype=w.dtype)
    if scheme == "int4":
        return int4_dequantize(*int4_quantize_weight(w), dtype=w.dtype)
    raise ValueError(f"unknown quantization scheme {scheme!r}; choose fp8 or int4")
