"""A name -> function registry with a decorator to add to it and a helpful lookup error."""
from __future__ import annotations

from typing import Callable


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable:
        def deco(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self[name] = fn
            return fn

        return deco

    def get_fn(self, name: str) -> Callable:
        if name not in self:
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {sorted(self)}")
        return self[name]
