"""The environment protocol of multi-turn rollouts, and its registry.

An environment is created per conversation. ``reset`` gives the opening messages (OpenAI format)
and the tool schemas the model may call; ``step`` takes the model's turn (its text content and
parsed tool calls) and answers with the messages to append (tool results, feedback) and whether
the conversation is over. Rewards stay with the reward function (``reward.fn``): it scores the
final answer (``Sample.response_text``), so environments need not know how answers are graded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from miles_ray.errors import UserValueError
from miles_ray.utils.registry import Registry
from miles_ray.utils.resolve import Contract

ENVIRONMENTS = Registry("environment", "agent.env", Contract(
    "cls() (one instance per conversation)", "an Environment (reset(prompt, label, messages) -> Observation, "
    "step(content, tool_calls) -> StepResult)", attrs=("reset", "step")))


@dataclass
class Observation:
    messages: list  # the conversation so far, OpenAI format
    tools: list = field(default_factory=list)  # OpenAI function schemas shown to the model (may be empty)


@dataclass
class StepResult:
    messages: list = field(default_factory=list)  # appended after the model's turn (role "tool" or "user")
    done: bool = False
    info: dict = field(default_factory=dict)


class Environment(Protocol):
    def reset(self, prompt: str, label: str, messages: list | None = None) -> Observation:
        """A new conversation about ``prompt`` (its chat ``messages`` when the dataset has them)."""

    def step(self, content: str, tool_calls: list[dict]) -> StepResult:
        """The model said ``content`` and called ``tool_calls`` (OpenAI shape; arguments a JSON string)."""


def register_env(name: str):
    return ENVIRONMENTS.register(name)


def make_env(spec: str, **kwargs) -> Environment:
    """A registered name or ``pkg.module:Class`` (checked: it takes ``kwargs`` and has ``reset`` and
    ``step``), instantiated with ``kwargs``; errors name the key and the fix."""
    env = ENVIRONMENTS.get_fn(spec)(**kwargs)
    if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
        raise UserValueError(f"agent.env='{spec}': {type(env).__name__} must have reset() and step() "
                             "(miles_ray.agents.env)")
    return env
