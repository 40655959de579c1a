"""Sampling parameters shared by every rollout engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables

    @classmethod
    def from_config(cls, cfg) -> "SamplingParams":
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
