"""FP8 matmul backends for engines serving FP8 weights (``rollout.fp8_backend``), one interface:
``matmul(x, weight_fp8, weight_scale, bias, out_dtype) -> y`` with 1 x 128 activation scales and
128 x 128 weight scales (DeepSeek-V3's layout).

- ``dequant``: quantize-dequantize the activations, multiply by the dequantized weight (any
  device; the CPU twin, and the fallback on GPUs without FP8 tensor cores).
- ``scaled_mm``: ``torch._scaled_mm`` with block-wise scales (Hopper, cuBLASLt >= 12.9; layouts
  from pytorch ``aten/src/ATen/native/cuda/ScaledBlas.cpp``: ``a`` row-major with its scale
  column-major, ``b`` = W^T column-major with scale Ws^T).
- ``deep_gemm``: ``deep_gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)`` (SGLang's ``sgl-deep-gemm``;
  fp32 scales on SM90), when it imports.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from miles_ray.errors import UserError
from miles_ray.quant import formats as fmt


def _dequant(x, w, ws, bias, out_dtype):
    return F.linear(fmt.fp8_qdq_activation(x).to(out_dtype), fmt.fp8_dequantize_weight(w, ws, out_dtype), bias)


def _scaled_mm(x, w, ws, bias, out_dtype):
    """Measured on an H200 (torch 2.11, cuBLASLt 13): right (0.3% of dequant's output) only when
    K / 128 is a multiple of 4, silently wrong otherwise, and unsupported below 16 rows: so other
    layers run the dequant path and rows are padded to a multiple of 16."""
    if x.shape[1] % (4 * fmt.BLOCK):
        return _dequant(x, w, ws, bias, out_dtype)
    rows = x.shape[0]
    if rows % 16:
        x = torch.cat([x, x.new_zeros(16 - rows % 16, x.shape[1])])
    xq, xs = fmt.fp8_quantize_activation(x)
    y = torch._scaled_mm(xq, w.t(), scale_a=xs.t().contiguous().t(), scale_b=ws.t(), out_dtype=torch.bfloat16)[:rows]
    return (y + bias if bias is not None else y).to(out_dtype)


def _deep_gemm(x, w, ws, bias, out_dtype):
    import deep_gemm

    xq, xs = fmt.fp8_quantize_activation(x)
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16, device=x.device)
    deep_gemm.fp8_gemm_nt((xq, xs), (w, ws), y)
    return (y + bias if bias is not None else y).to(out_dtype)


BACKENDS = {"dequant": _dequant, "scaled_mm": _scaled_mm, "deep_gemm": _deep_gemm}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to use on ``device``; a clear error where FP8 kernels cannot run."""
    if device.type != "cuda":
        if backend not in ("auto", "dequant"):
            raise UserError(f"rollout.fp8_backend={backend} needs a GPU; on {device.type} FP8 runs as dequant")
        return "dequant"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if backend == "dequant":
        return backend
    if (major, minor) < (9, 0):
        raise UserError(f"rollout.precision=fp8 with rollout.fp8_backend={backend}: {name} (compute capability "
                        f"{major}.{minor}) has no block-scaled FP8 GEMM (Hopper, 9.0, and newer); fall back with "
                        "rollout.fp8_backend=dequant (the same FP8 numbers, dequantized) or rollout.precision=bf16")
    if backend == "auto":
        try:
            import deep_gemm  # noqa: F401

            return "deep_gemm"
        except Exception:  # noqa: BLE001 - not installed or not loadable: torch's kernel
            return "scaled_mm"
    return backend


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, bias, out_dtype, backend: str = "dequant"):
    """``x [..., K]`` times FP8 ``w [N, K]`` (scales ``ws``) -> ``[..., N]`` in ``out_dtype``."""
    flat = x.reshape(-1, x.shape[-1])
    return BACKENDS[backend](flat, w, ws, bias, out_dtype).reshape(*x.shape[:-1], w.shape[0])
