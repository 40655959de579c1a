"""The rollout-engine interface, and the factory that picks an implementation from the config.

Every engine a :class:`actors.RolloutEngineActor` holds implements :class:`RolloutEngine`:

- :class:`miles_ray.rollout.in_process.InProcessEngine`: the ``hf`` or ``native`` engine in the
  actor's process (native engines run continuous batching in an :class:`EngineLoop` thread).
- :class:`miles_ray.rollout.http_engine.HttpEngine`: an engine server (our native server or
  ``sglang.launch_server``) launched as a subprocess in the actor's bundle, driven over HTTP.

Health (see :mod:`miles_ray.rollout.health`): an engine serves only when READY; a restarted
engine starts STALE and serves after a complete weight load (a refit).
"""
from __future__ import annotations

from typing import Any, Protocol

from miles_ray.config import Config
from miles_ray.rollout.types import SamplingParams
from miles_ray.sample import Sample


class RolloutEngine(Protocol):
    def generate(self, requests: list[dict], n: int, params: SamplingParams) -> list[Sample]:
        """``n`` samples per request dict (prompt, label, prompt_index, group_id)."""

    def abort(self, rid: str) -> bool: ...

    def pause(self) -> None:
        """Stop between two decode steps; running requests are kept (partial rollout)."""

    def resume(self) -> None: ...

    def load_part(self, bucket) -> None:
        """One bucket of a streamed weight version; the engine is STALE until :meth:`finish_load`."""

    def finish_load(self, version: int) -> int:
        """Complete the streamed load of ``version``; returns the version served (READY)."""

    def load_buckets(self, buckets: list, version: int) -> int:
        """A whole weight version at once; returns the version served (READY)."""

    def release_memory(self) -> None:
        """Free weights and cache (colocated training); RELEASED."""

    def resume_memory(self) -> None:
        """Memory back, weights garbage until the next load; STALE."""

    def health(self) -> dict:
        """``{"state": ready|released|stale, "weight_version": int}``."""

    def rng_state(self) -> Any:
        """Sampling RNG state for checkpoints (None where the server owns it)."""

    def set_rng_state(self, state: Any) -> None: ...

    def load_draft(self, weights: dict, version: int) -> int:
        """New draft-model weights (speculative rollout with an online draft)."""

    def spec_stats(self) -> dict:
        """Speculation counters since the last call (empty without a draft)."""

    def url(self) -> str | None:
        """Base URL of the engine server (None in-process)."""

    def close(self) -> None: ...


def make_rollout_engine(cfg: Config, rank: int, host: str = "127.0.0.1", restarted: bool = False,
                        token: str | None = None) -> RolloutEngine:
    """The engine the config asks for: over HTTP (``rollout.serve_http`` or the sglang backend,
    listening on ``host``, requiring ``token`` when given) or in-process. ``restarted``: the actor
    was restarted by Ray, so the engine starts STALE until a refit."""
    if cfg.rollout.over_http:
        from miles_ray.rollout.http_engine import HttpEngine

        return HttpEngine.launch(cfg, rank, host, token)
    from miles_ray.rollout.in_process import InProcessEngine

    return InProcessEngine.from_config(cfg, rank, restarted)
