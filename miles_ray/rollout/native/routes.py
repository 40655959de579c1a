"""Per-request MoE routing traces in the native engine (a no-op for dense models).

The engine's forwards run every token of a batch through the MoE routers; :class:`RouteTracker`
records each call's top-k ids (:class:`miles_ray.models.moe.Routing`) and appends them to the
requests they belong to, so each finished request carries the experts of every token it fed to
the model: its prompt (prefill) and each response token but the last (decode).
"""
from __future__ import annotations

import torch

from miles_ray.models.moe import Routing, encode


class RouteTracker:
    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        """``enabled=False``: no traces (true on-policy: routing is bit-identical to the trainer's by
        construction, and the exact forward does not go through the router modules)."""
        routing = Routing(model) if enabled else None
        self.routing = routing if routing is not None and routing.is_moe else None

    @property
    def active(self) -> bool:
        return self.routing is not None

    def begin(self) -> None:
        if self.routing is not None:
            self.routing.start_recording()

    def prefill(self, requests: list, rows: list[int], padded_len: int) -> None:
        """``requests[i]`` was prefilled as row ``rows[i]`` of a ``[rows, padded_len]`` batch."""
        if self.routing is None:
            return
        ids = self.routing.collect()
        ids = ids.view(-1, padded_len, *ids.shape[1:])
        for req, row in zip(requests, rows):
            req.routes = [ids[row, :len(req.prompt_ids)].cpu()]

    def decode(self, requests: list) -> None:
        """One token was fed for each of ``requests`` (in batch order)."""
        if self.routing is None:
            return
        ids = self.routing.collect()
        for i, req in enumerate(requests):
            req.routes.append(ids[i:i + 1].cpu())

    def trace(self, request) -> dict | None:
        if self.routing is None or not getattr(request, "routes", None):
            return None
        return encode(torch.cat(request.routes), self.routing.num_experts)
