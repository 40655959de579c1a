"""A name -> function registry with a decorator to add to it; lookups also take ``pkg.module:attr``.

``get_fn(spec)`` goes through :func:`miles_ray.utils.resolve.resolve`: a registered name, else an
import path checked against the registry's :class:`~miles_ray.utils.resolve.Contract` (once: the
object is cached, so hot paths such as a loss per micro-batch pay for the checks a single time).
``spec in registry`` stays "is it registered"; an import path is never added to the registry.
"""
from __future__ import annotations

from typing import Callable, Optional

from miles_ray.utils.resolve import Contract, resolve


class Registry(dict):
    def __init__(self, kind: str, field: Optional[str] = None, contract: Optional[Contract] = None):
        """``kind`` names an entry in messages ("policy loss"); ``field`` is the config key that
        selects one ("algorithm.policy_loss"); ``contract`` says how plug-ins are called."""
        super().__init__()
        self.kind, self.field, self.contract = kind, field, contract
        self.imported: dict = {}  # import path -> object (checked once)

    def register(self, name: str) -> Callable:
        def deco(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self[name] = fn
            return fn

        return deco

    def get_fn(self, name: str, field: Optional[str] = None, choices=None) -> Callable:
        """The entry ``name`` names: registered, or an import path (``PluginError`` / ``KeyError`` else)."""
        if name in self:
            return self[name]
        if name not in self.imported:
            self.imported[name] = resolve(name, self, field, choices)
        return self.imported[name]

    def check(self, name: str, field: Optional[str] = None) -> None:
        """Fail now (config time) on a name that is neither registered nor a usable import path."""
        self.get_fn(name, field)
