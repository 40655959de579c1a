"""Quantized MoE experts: transformers 5 keeps a sparse block's experts as fused 3-D parameters
(``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), which ``nn.Linear``-based
quantization never sees, although on a MoE they hold most of the weights.

Each expert matrix is quantized on its own, in the same formats as a linear's weight (FP8 128 x
128 blocks, ``scale [E, ceil(N/128), ceil(K/128)]``; INT4 groups of 128 along the input dim,
packed ``[E, N, K/2]``, ``scale [E, N, K/128]``); FP8 experts are weight-only (the expert GEMMs
run inside transformers' experts forward, whose activations we do not see).

The experts module keeps its class (whose forward dispatches to the configured experts
implementation) under a subclass that, for the duration of each forward, shadows the expert
parameters with the tensors to compute with:

- engines (:class:`QuantExperts`): ``<name>`` holds the quantized bytes and ``<name>_scale`` its
  scales (what a weight sync loads); the forward uses their dequantization (cached until the next
  load, :meth:`QuantExperts.refresh_quantized`);
- trainers (:class:`FakeQuantExperts`): the parameters stay (same names, FSDP shards them); the
  forward uses their quantize-dequantization with a straight-through gradient (QAT).
"""
from __future__ import annotations

import torch

from miles_ray.quant import formats as fmt

EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")  # transformers 5 fused expert tensors


def expert_weights(module: torch.nn.Module) -> list[str]:
    """The fused 3-D expert tensors of ``module`` ([E, out, in] layout), empty if it holds none."""
    if getattr(module, "is_transposed", False):  # [E, in, out] layouts are left in the model dtype
        return []
    return [n for n in EXPERT_WEIGHTS if isinstance(getattr(module, n, None), torch.Tensor)
            and getattr(module, n).dim() == 3]


def quantize_tensor(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What travels for ``w`` (``[N, K]`` or ``[E, N, K]``): (quantized bytes, scale)."""
    if scheme == "fp8":
        return fmt.fp8_quantize_weight(w)
    if scheme != "int4":
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose fp8 or int4")
    q, scale = fmt.int4_quantize_weight(w)
    return fmt.int4_pack(q), scale


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor, scheme: str, dtype) -> torch.Tensor:
    if scheme == "fp8":
        return fmt.fp8_dequantize_weight(q, scale, dtype)
    return fmt.int4_dequantize(fmt.int4_unpack(q), scale, dtype)


class _Shadowed:
    """Mixin: run the experts' own forward with :meth:`compute_weights` standing in for the
    parameters (instance attributes are found before nn.Module's parameter/buffer lookup)."""

    def forward(self, *args, **kwargs):
        weights = self.compute_weights()
        self.__dict__.update(weights)
        try:
            return super().forward(*args, **kwargs)
        finally:
            for name in weights:
                self.__dict__.pop(name, None)


class QuantExperts(_Shadowed):
    def quantize_experts(self, scheme: str) -> None:
        self.scheme, self.quant_names, self._dense = scheme, expert_weights(self), None
        for name in self.quant_names:
            w = getattr(self, name)
            q, scale = quantize_tensor(w.data, scheme)
            self.serve_dtype = w.dtype
            delattr(self, name)
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", scale)

    def refresh_quantized(self) -> None:
        """The buffers were overwritten in place (a weight sync): dequantize again on next use."""
        self._dense = None

    def compute_weights(self) -> dict:
        if self._dense is None:
            self._dense = {n: dequantize_tensor(getattr(self, n), getattr(self, f"{n}_scale"), self.scheme,
                                                self.serve_dtype) for n in self.quant_names}
        return self._dense


class FakeQuantExperts(_Shadowed):
    def fake_quantize_experts(self, scheme: str) -> None:
        self.scheme, self.quant_names = scheme, expert_weights(self)

    def compute_weights(self) -> dict:
        out = {}
        for name in self.quant_names:
            w = getattr(self, name)
            out[name] = w + (fmt.qdq_weight(w.detach(), self.scheme) - w).detach()  # straight-through
        return out


_CLASSES: dict = {}


def _subclass(module: torch.nn.Module, mixin: type) -> None:
    """Give ``module`` the class ``mixin`` + its own class (made once per pair)."""
    base = type(module)
    if issubclass(base, mixin):
        return
    if (mixin, base) not in _CLASSES:
        _CLASSES[mixin, base] = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {})
    module.__class__ = _CLASSES[mixin, base]


def experts_modules(model: torch.nn.Module, prefix: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every experts module under ``prefix`` holding fused 3-D expert weights."""
    return [(n, m) for n, m in model.named_modules() if n.startswith(prefix) and expert_weights(m)]


def quantize_engine_experts(model: torch.nn.Module, prefix: str, scheme: str) -> int:
    """Engines: every experts module serves quantized weights; returns how many tensors."""
    count = 0
    for _, module in experts_modules(model, prefix):
        _subclass(module, QuantExperts)
        module.quantize_experts(scheme)
        count += len(module.quant_names)
    return count


def fake_quantize_experts(model: torch.nn.Module, prefix: str, scheme: str) -> int:
    """Trainers: every experts module computes with fake-quantized weights (QAT); tensors count."""
    count = 0
    for _, module in experts_modules(model, prefix):
        _subclass(module, FakeQuantExperts)
        module.fake_quantize_experts(scheme)
        count += len(module.quant_names)
    return count
