"""The Sample record that flows from rollout through rewards and advantages to training."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Sample:
    prompt_index: int  # row of the prompt in its dataset
    group_id: int  # samples of one prompt in one step share a group id
    prompt: str
    label: str
    prompt_ids: list
    response_ids: list = field(default_factory=list)
    response_logprobs: list = field(default_factory=list)  # behaviour policy, one per response token
    response_text: str = ""
    finish_reason: str = ""  # "stop" (eos / stop token) or "length"
    weight_version: int = 0  # version of the weights that produced the response
    reward: float = 0.0
    # multi-turn (rollout.fn): 1 on model tokens, 0 on tool / environment tokens; None: all model tokens.
    # response_logprobs holds 0.0 on the masked tokens (they were not sampled).
    loss_mask: Optional[list] = None
    error: str = ""  # why the rollout function failed ("" = it did not); scored with reward.failure_score
    metadata: dict = field(default_factory=dict)  # e.g. turns, tool calls, the environment's info
    # MoE: experts the engine routed each fed token to (prompt + response but the last), a
    # miles_ray.models.moe trace {"shape": [tokens, layers, k], "b64": ...}; replayed by R3
    routed_experts: Optional[dict] = None
    # filled by the trainer / critic / advantage estimator before the update, one per response token
    old_logprobs: Optional[list] = None
    ref_logprobs: Optional[list] = None
    values: Optional[list] = None
    advantages: Optional[list] = None
    returns: Optional[list] = None

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    def to_dict(self) -> dict:
        return asdict(self)
