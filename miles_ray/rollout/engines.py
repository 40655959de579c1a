"""The rollout-engine interface (the factory that picks an implementation: :mod:`.backends`).

Every engine a :class:`actors.RolloutEngineActor` holds implements :class:`RolloutEngine`:

- :class:`miles_ray.rollout.in_process.InProcessEngine`: the ``hf`` or ``native`` engine in the
  actor's process (native engines run continuous batching in an :class:`EngineLoop` thread).
- :class:`miles_ray.rollout.http.engine.HttpEngine`: an engine server (our native server or
  ``sglang.launch_server``) launched as a subprocess in the actor's bundle, driven over HTTP.

Health (see :mod:`miles_ray.rollout.health`): an engine serves only when READY; a restarted
engine starts STALE and serves after a complete weight load (a refit).
"""
from __future__ import annotations

from typing import Any, Protocol

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


def stream_by_request(engine, requests: list[dict], n: int, params: SamplingParams):
    """Yield each request's ``n`` Samples as soon as they are done (completion order). An engine
    with its own ``generate_stream`` (admitting every request at once) is used as is; otherwise one
    ``generate`` per request runs in a thread."""
    if hasattr(engine, "generate_stream"):
        yield from engine.generate_stream(requests, n, params)
        return
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max(1, min(32, len(requests)))) as pool:
        futures = [pool.submit(engine.generate, [r], n, params) for r in requests]
        for fut in as_completed(futures):
            yield fut.result()
