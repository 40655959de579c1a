"""Weight versions: one convention for the whole project.

- Version 0: the weights an engine loaded from disk when it started (before any sync).
- Version ``v >= 1``: the policy after ``v - 1`` optimizer steps of RL, i.e. after ``k`` train
  steps the trainer holds ``after_steps(k) = k + 1``. The first sync of a run pushes version 1.
- An engine serves version ``v`` only after a complete load of ``v`` (see ``rollout.health``);
  every sample records the version that produced its first token (``Sample.weight_version``).
- A checkpoint written after ``k`` train steps holds version ``after_steps(k)`` (checked on save).
- Training step ``k`` (0-based) trains the weights of ``after_steps(k)``; a sample used there lags
  ``after_steps(k) - sample.weight_version`` versions (its staleness).
"""
from __future__ import annotations

INITIAL = 1  # the policy's weights before any RL step, as pushed by the first sync


def after_steps(steps: int) -> int:
    """The weight version the trainer holds after ``steps`` train steps."""
    if steps < 0:
        raise ValueError(f"train steps must be >= 0, got {steps}")
    return INITIAL + steps


def steps_of(version: int) -> int:
    """Train steps behind a weight version (inverse of :func:`after_steps`)."""
    if version < INITIAL:
        raise ValueError(f"weight version {version} precedes the first synced version {INITIAL}")
    return version - INITIAL


def staleness(trained_version: int, sample_version: int) -> int:
    """Versions a sample lags behind the weights it is trained on (>= 0 by construction)."""
    lag = trained_version - sample_version
    if lag < 0:
        raise AssertionError(f"a sample of version {sample_version} is newer than the trained version {trained_version}")
    return lag
