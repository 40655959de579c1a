"""Thin Ray actor wrappers around miles_ray objects (no algorithm logic here).

Exports load lazily (PEP 562): a Ray worker that runs one actor class imports this package first,
and the buffer, reward or router actors must not pay for the trainers' torch/transformers imports.
"""
import importlib

_EXPORTS = {
    "BufferActor": "actors.buffer", "DraftTrainerActor": "actors.draft", "RankGroup": "actors.group",
    "RewardWorker": "actors.reward", "RolloutEngineActor": "actors.rollout", "RouterActor": "actors.router",
    "CriticActor": "actors.trainer", "TrainerActor": "actors.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
