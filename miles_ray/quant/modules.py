"""Quantized linears for engines, fake-quantized linears for trainers, and the sync transform.

The quantized layers are the decoder's ``nn.Linear`` modules (attention and MLP projections) and
its MoE experts' fused 3-D weights (:mod:`miles_ray.quant.experts`); embeddings, the LM head, norms
and MoE routers stay in the model dtype (as SGLang and vLLM serve FP8 / W4A16 checkpoints).
:func:`quantizable` names them the same way in engines and trainers.

- Engine (:class:`QuantLinear`): holds what the trainer sent, ``weight`` (FP8 ``[N, K]`` or packed
  INT4 ``[N, K/2]`` uint8) and ``weight_scale``, and computes with it: FP8 quantizes activations in
  1 x 128 groups and multiplies by the dequantized weight (CPU; a GPU kernel where one is chosen,
  :mod:`miles_ray.quant.kernels`), INT4 multiplies 16-bit activations by the dequantized weight.
- Trainer (:class:`FakeQuantLinear`): the fp32 master weight, quantize-dequantized in the forward
  with a straight-through gradient (QAT); FP8 also the activations. Its numbers are the engine's.
- Sync (:func:`quantize_state`): each quantizable ``<name>.weight`` travels as its quantized bytes
  plus ``<name>.weight_scale``; an experts tensor ``<experts>.gate_up_proj`` as its bytes plus
  ``<experts>.gate_up_proj_scale``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from miles_ray.quant import formats as fmt
from miles_ray.quant.experts import expert_weights, fake_quantize_experts, quantize_engine_experts, quantize_tensor

SCHEMES = ("fp8", "int4")


def _layers_prefix(model: torch.nn.Module) -> str:
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    return next(n for n, m in model.named_modules() if m is body) + ".layers."


def _linears(model: torch.nn.Module) -> list[str]:
    prefix = _layers_prefix(model)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)]


def quantizable(model: torch.nn.Module) -> list[str]:
    """Names of the decoder's linears (``model.layers.<i>...``, module names: the tensor is
    ``<name>.weight``) in module order, then of its fused MoE expert tensors (tensor names, e.g.
    ``model.layers.<i>.mlp.experts.gate_up_proj``)."""
    prefix = _layers_prefix(model)
    experts = [f"{n}.{w}" for n, m in model.named_modules() if n.startswith(prefix) for w in expert_weights(m)]
    return _linears(model) + experts


def tensor_key(name: str, state: dict) -> str:
    """The state-dict key of a :func:`quantizable` name (an experts tensor is named as is)."""
    return name if name in state else f"{name}.weight"


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


quantize_weight = quantize_tensor  # what travels for a weight: (quantized bytes, scale)


class QuantLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, scheme: str):
        super().__init__()
        self.scheme, self.out_features, self.in_features = scheme, linear.out_features, linear.in_features
        q, scale = quantize_weight(linear.weight.data, scheme)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias
        self.dtype = linear.weight.dtype
        self.backend = "dequant"  # FP8 GEMM kernel (miles_ray.quant.kernels); set by the engine
        self._dense = None  # dequantized weight, rebuilt after each weight load

    def refresh_quantized(self) -> None:
        """The buffers were overwritten in place (a weight sync): dequantize again on next use."""
        self._dense = None

    def dense_weight(self) -> torch.Tensor:
        if self._dense is None:
            if self.scheme == "fp8":
                self._dense = fmt.fp8_dequantize_weight(self.weight, self.weight_scale, self.dtype)
            else:
                self._dense = fmt.int4_dequantize(fmt.int4_unpack(self.weight), self.weight_scale, self.dtype)
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "fp8" and self.backend != "dequant":
            from miles_ray.quant.kernels import fp8_matmul

            return fp8_matmul(x, self.weight, self.weight_scale, self.bias, x.dtype, self.backend)
        if self.scheme == "fp8":
            x = fmt.fp8_qdq_activation(x)
        return F.linear(x, self.dense_weight(), self.bias)


class FakeQuantLinear(torch.nn.Linear):
    """A Linear (same parameters, same names) whose forward uses the quantize-dequantized weight
    (and, for FP8, activations) with a straight-through gradient."""

    def __init__(self, linear: torch.nn.Linear, scheme: str):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features, self.scheme = linear.in_features, linear.out_features, scheme
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w + (fmt.qdq_weight(w.detach(), self.scheme) - w).detach()
        if self.scheme == "fp8":
            x = x + (fmt.fp8_qdq_activation(x.detach()) - x).detach()
        return F.linear(x, w.to(x.dtype), self.bias)


def quantize_engine_model(model: torch.nn.Module, scheme: str, fp8_backend: str = "auto") -> int:
    """Engines: every quantizable linear becomes a :class:`QuantLinear` (FP8 ones on the resolved
    GEMM backend) and every experts module serves quantized experts; returns how many tensors."""
    names = _linears(model)
    backend = "dequant"
    if scheme == "fp8":
        from miles_ray.quant.kernels import resolve_backend

        backend = resolve_backend(fp8_backend, next(model.parameters()).device)
    for name in names:
        module = QuantLinear(model.get_submodule(name), scheme)
        module.backend = backend
        _replace(model, name, module)
    return len(names) + quantize_engine_experts(model, _layers_prefix(model), scheme)


def fake_quantize_model(model: torch.nn.Module, scheme: str) -> int:
    """Trainers: every quantizable linear becomes a :class:`FakeQuantLinear` (parameters kept),
    every experts module fake-quantizes its expert tensors; returns how many tensors."""
    names = _linears(model)
    for name in names:
        _replace(model, name, FakeQuantLinear(model.get_submodule(name), scheme))
    return len(names) + fake_quantize_experts(model, _layers_prefix(model), scheme)


def quantize_state(state: dict, names: list[str], scheme: str) -> dict:
    """A state dict for the engines: each :func:`quantizable` tensor of ``names`` quantized (its
    bytes under its own key, plus ``<key>_scale``); everything else as is."""
    out = {}
    wanted = {tensor_key(n, state) for n in names}
    for key, value in state.items():
        if key in wanted:
            out[key], out[key + "_scale"] = quantize_weight(value, scheme)
        else:
            out[key] = value
    return out
