"""Sampling parameters shared by every rollout engine (the subset of SGLang's that RL needs)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


def engine_seed(run_seed: int, rank: int) -> int:
    """Seed of rollout engine ``rank`` (its sampling RNG and its process)."""
    return run_seed + 1000 + rank


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    stop: list = field(default_factory=list)  # stop strings
    stop_token_ids: list = field(default_factory=list)  # besides eos
    ignore_eos: bool = False

    @classmethod
    def from_config(cls, cfg) -> "SamplingParams":
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, getattr(cfg, "min_p", 0.0),
                   list(getattr(cfg, "stop", []) or []), ignore_eos=getattr(cfg, "ignore_eos", False))

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        d = dict(d or {})
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
