"""Mixture-of-experts routing: record it in rollout, replay it in training (R3), compare the two.

transformers' MoE blocks (Qwen3-MoE, Mixtral) call a top-k router module (``block.gate``) that
returns ``(router_logits, top_k_weights, top_k_index)`` and then ``block.experts(hidden, index,
weights)``. :class:`Routing` puts a forward hook on every router, in layer order:

- recording (engines): the hook keeps each call's ``top_k_index`` for the caller to collect;
- replay (trainers, ``algorithm.routing_replay=r3``): the hook replaces the router's choice by
  the experts recorded in rollout wherever one was recorded (``-1`` = none: the router's own
  choice). The gate weights are recomputed from the trainer's own router logits over the
  replayed experts (softmax in fp32, renormalised over the top-k as the router does), so the
  router still gets gradients;
- agreement (both): slots (token x layer) where the router's own top-k set equals the recorded
  one, and where the experts actually used do.

A trace travels with its sample as ``{"shape": [tokens, layers, k], "dtype": <name>, "b64": <bytes>}``
(JSON-safe: dumps, async checkpoints and the HTTP API carry it as is). The dtype is sized for the
model's expert count (:func:`trace_dtype`: uint8 up to 256 experts, int16 up to 32767, else int32;
a trace holding ``-1`` = "not recorded" slots is signed); a trace without ``dtype`` is the older
uint8 format and decodes as before.
"""
from __future__ import annotations

import base64

import numpy as np
import torch


def find_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router of every sparse MoE block, in layer order (empty for a dense model)."""
    return [m.gate for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")
            and hasattr(m.gate, "top_k")]


def trace_dtype(num_experts: int, signed: bool = False) -> str:
    """The narrowest numpy dtype holding expert ids ``0 .. num_experts - 1`` (and ``-1`` if ``signed``)."""
    if num_experts <= 256 and not signed:
        return "uint8"
    if num_experts <= 128:
        return "int8"
    return "int16" if num_experts <= 32767 else "int32"


def encode(index: torch.Tensor, num_experts: int | None = None) -> dict:
    """``[tokens, layers, k]`` expert ids (``-1``: not recorded) as a JSON-safe trace whose dtype
    fits ``num_experts`` (default: the largest id + 1). Raises on an id that does not fit."""
    index = index.detach().to(torch.long).cpu()
    top = int(index.max()) + 1 if index.numel() else 1
    lowest = int(index.min()) if index.numel() else 0
    num_experts = top if num_experts is None else int(num_experts)
    if top > num_experts or lowest < -1:
        raise ValueError(f"expert ids span [{lowest}, {top - 1}], outside [-1, {num_experts - 1}]")
    dtype = trace_dtype(num_experts, signed=lowest < 0)
    arr = index.numpy().astype(dtype)
    return {"shape": list(arr.shape), "dtype": dtype, "b64": base64.b64encode(arr.tobytes()).decode()}


def decode(trace: dict) -> torch.Tensor:
    """A trace back to ``[tokens, layers, k]`` long ids (``-1``: not recorded)."""
    dtype = np.dtype(trace.get("dtype", "uint8"))  # no dtype: the original uint8 format
    arr = np.frombuffer(base64.b64decode(trace["b64"]), dtype=dtype).reshape(trace["shape"])
    return torch.from_numpy(arr.astype(np.int64))


class Routing:
    def __init__(self, model: torch.nn.Module):
        self.routers = find_routers(model)
        self.reference: torch.Tensor | None = None  # recorded ids [tokens, layers, k], -1: none recorded
        self.replay = False  # use the reference's experts (R3) or only compare with them
        self.counting = False  # agreement counted in this forward (not in a checkpoint recompute)
        self.recording = False
        self.captured: list[torch.Tensor] = []
        self.stats = {"slots": 0, "own_agree": 0, "used_agree": 0}
        for layer, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(layer))

    @property
    def is_moe(self) -> bool:
        return bool(self.routers)

    @property
    def num_experts(self) -> int:
        return max((int(getattr(r, "num_experts", 0) or r.weight.shape[0]) for r in self.routers), default=0)

    @property
    def top_k(self) -> int:
        return self.routers[0].top_k if self.routers else 0

    def start_recording(self) -> None:
        self.recording, self.captured = True, []

    def collect(self) -> torch.Tensor:
        """This forward's ids ``[tokens, layers, k]`` (tokens in the forward's flattened order)."""
        out = torch.stack(self.captured, dim=1) if self.captured else torch.zeros(0, 0, 0, dtype=torch.long)
        self.recording, self.captured = False, []
        return out

    def set_reference(self, index: torch.Tensor | None, replay: bool) -> None:
        """Recorded ids for the next forward's flattened tokens (None: nothing recorded), replayed
        or only compared with. Kept until the next call, so a checkpointed layer recomputed in
        backward replays the same experts."""
        self.reference, self.replay, self.counting = index, replay, index is not None

    def stop_counting(self) -> None:
        self.counting = False

    def take_stats(self) -> dict:
        out, self.stats = dict(self.stats), {"slots": 0, "own_agree": 0, "used_agree": 0}
        return out

    def _hook(self, layer: int):
        def hook(module, args, output):
            logits, weights, index = output
            if self.recording:
                self.captured.append(index.detach())
            if self.reference is None:
                return None
            if self.reference.shape[0] != index.shape[0]:
                raise RuntimeError(f"routing reference holds {self.reference.shape[0]} tokens, the forward has "
                                   f"{index.shape[0]}: set_reference() must describe the next forward")
            recorded = self.reference[:, layer].to(index.device)
            known = recorded[:, 0] >= 0
            used = torch.where(known[:, None], recorded, index) if self.replay else index
            if self.counting:
                self._count(index, recorded, used, known)
            if not self.replay:
                return None
            probs = torch.softmax(logits.float(), dim=-1)
            picked = probs.gather(-1, used)
            if getattr(module, "norm_topk_prob", True):
                picked = picked / picked.sum(-1, keepdim=True)
            return logits, picked.to(weights.dtype), used

        return hook

    @torch.no_grad()
    def _count(self, own, recorded, used, known) -> None:
        count_agreement(self.stats, own, recorded, used, known)


@torch.no_grad()
def count_agreement(stats: dict, own, recorded, used, known) -> None:
    """Add to ``stats`` the recorded slots (``known``), those where the router's own top-k equals the
    recording (``own_agree``) and those where the experts used equal it (``used_agree``)."""
    if not bool(known.any()):
        return
    rec = recorded[known].sort(-1).values
    stats["slots"] += int(known.sum())
    stats["own_agree"] += int((own[known].sort(-1).values == rec).all(-1).sum())
    stats["used_agree"] += int((used[known].sort(-1).values == rec).all(-1).sum())
