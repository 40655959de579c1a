"""Row-invariant building blocks of the exact forward (:mod:`miles_ray.models.exact`).

A token's numbers must not depend on anything but the token's own inputs: not on how many rows
share a call, where in the call the row sits, how many threads run it, nor where in memory the
operands lie. What each helper holds fixed:

- :func:`fixed_bmm`: products in ``torch.bmm`` calls of exactly ``CHUNK`` batch entries, every
  operand copied into a canonical layout (base address a multiple of ``ALIGN`` bytes, each batch
  entry starting at a multiple of ``ALIGN`` bytes); a broadcast weight is used in place when its
  address is canonical and copied otherwise. BLAS kernels pick their code path by operand
  alignment: MKL on CPU (no CNR mode) rounds differently for a weight at 8 mod 16 bytes than at
  0 mod 16 under AVX2, so two processes whose parameters were allocated differently (loading
  path, release/resume, FSDP buffers) disagreed in the last bit.
- :func:`pointwise`: transcendental element-wise ops (SiLU, cos/sin) on a flat buffer padded to a
  multiple of 64 elements, in blocks of ``GRAIN`` elements: ATen runs such blocks on one thread
  and through its vector path only (its scalar tail, whose ``exp`` differs from the vector one in
  the last bit, and its per-thread split points moved with the tensor size and thread count).
- :func:`by_rows`: row-wise functions (RMSNorm, softmax, log-softmax) in calls of ``CHUNK`` rows.
"""
from __future__ import annotations

import torch

CHUNK = 64  # rows / batch entries in every call (fixed: kernels never see another shape)
ALIGN = 64  # bytes: canonical alignment of every product operand and batch entry
GRAIN = 32768  # elements per pointwise call: ATen's grain size (one thread, no split points)


def _step(dtype) -> int:
    return max(1, ALIGN // torch.empty((), dtype=dtype).element_size())


def _round(n: int, m: int) -> int:
    return -(-n // m) * m


def aligned_empty(rows: int, cols: int, dtype, device, zero: bool = True) -> torch.Tensor:
    """``[rows, cols]`` (zeros unless ``zero=False``) whose base and every row start at a multiple
    of ``ALIGN`` bytes."""
    step = _step(dtype)
    stride = _round(cols, step)
    make = torch.zeros if zero else torch.empty
    buf = make(rows * stride + step, dtype=dtype, device=device)
    off = (-(buf.data_ptr() // buf.element_size())) % step
    return buf[off:off + rows * stride].view(rows, stride)[:, :cols]


def aligned_zeros(rows: int, cols: int, dtype, device) -> torch.Tensor:
    return aligned_empty(rows, cols, dtype, device)


def canonical(x: torch.Tensor, total: int) -> torch.Tensor:
    """``x [n, m, k]`` copied into a canonical layout, zero-padded to ``total`` entries."""
    n, m, k = x.shape
    buf = aligned_zeros(total, m * k, x.dtype, x.device)
    buf[:n] = x.reshape(n, m * k)
    return buf.unflatten(1, (m, k))


def is_canonical(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGN == 0


def aligned_weight(w: torch.Tensor) -> torch.Tensor:
    """A contiguous weight at a canonical address: ``w`` itself when it is one, else a copy."""
    if w.is_contiguous() and is_canonical(w):
        return w
    out = aligned_empty(1, w.numel(), w.dtype, w.device, zero=False)
    out.copy_(w.reshape(1, -1))
    return out.view(w.shape)


@torch.no_grad()
def align_parameters(module: torch.nn.Module) -> None:
    """Move every parameter whose data is not at a canonical address to one (same values), so that
    :func:`aligned_weight` finds it there and copies nothing."""
    for p in module.parameters():
        if p.data.is_contiguous() and not is_canonical(p.data) and p.device.type != "meta":
            p.data = aligned_weight(p.data)


def fixed_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [n, m, k]`` times ``b``: one ``[k, p]`` matrix for every entry (2-D ``b``, broadcast with
    batch stride 0 whatever ``n`` is; pass it through :func:`aligned_weight`) or ``b [n, k, p]``; in
    ``torch.bmm`` calls of exactly ``CHUNK`` canonical batch entries."""
    n = a.shape[0]
    total = _round(n, CHUNK)
    a = canonical(a, total)
    if b.dim() == 2:
        parts = [torch.bmm(a[i:i + CHUNK], b.expand(CHUNK, -1, -1)) for i in range(0, total, CHUNK)]
    else:
        b = canonical(b, total)
        parts = [torch.bmm(a[i:i + CHUNK], b[i:i + CHUNK]) for i in range(0, total, CHUNK)]
    return torch.cat(parts)[:n]


def by_rows(fn, x: torch.Tensor) -> torch.Tensor:
    """A row-wise ``fn`` (over the last dim) applied in calls of exactly ``CHUNK`` rows."""
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    pad = -n % CHUNK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[-1])])
    out = torch.cat([fn(flat[i:i + CHUNK]) for i in range(0, n + pad, CHUNK)])[:n]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def pointwise(fn, x: torch.Tensor) -> torch.Tensor:
    """An element-wise ``fn`` whose value at an element depends on that element only."""
    flat = x.reshape(-1)
    n = flat.numel()
    pad = -n % 64
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    out = torch.cat([fn(flat[i:i + GRAIN]) for i in range(0, n + pad, GRAIN)])
    return out[:n].view(x.shape)


class _RowLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        w = aligned_weight(weight)
        return fixed_bmm(x.unsqueeze(1), w.t()).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad @ weight, grad.t() @ x


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` computed row by row (row-invariant); ``x [..., K]``."""
    out = _RowLinear.apply(x.reshape(-1, x.shape[-1]), weight)
    out = out + bias if bias is not None else out
    return out.reshape(*x.shape[:-1], weight.shape[0])


def softmax32(t: torch.Tensor) -> torch.Tensor:
    return torch.softmax(t.float(), dim=-1)
