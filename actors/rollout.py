"""RolloutEngineActor: one rollout engine with explicit health (ready / released / stale).

Thin: it holds one :class:`miles_ray.rollout.engines.RolloutEngine` (in-process, or an engine
server launched in this actor's bundle and driven over HTTP) and forwards calls to it. Only what
needs Ray lives here: the node address for servers beyond loopback, whether Ray restarted this
actor, and holding this engine's side of the weight transports (:mod:`miles_ray.weights`).
"""
from __future__ import annotations

import ray

from actors.common import ActorBase, setup_worker_process
from miles_ray.config import Config


@ray.remote(concurrency_groups={"gen": 64})
class RolloutEngineActor(ActorBase):
    """``generate`` runs in the "gen" concurrency group (many calls share continuous batching);
    everything else runs one at a time, in call order (streamed weight loads rely on it)."""

    def __init__(self, cfg: dict, rank: int = 0, token: str | None = None):
        """``token``: the run's bearer token, required by an engine server bound beyond loopback."""
        from miles_ray.agents.wrap import with_rollout_fn
        from miles_ray.rollout.backends import make_rollout_engine
        from miles_ray.rollout.types import engine_seed

        self.cfg = Config.model_validate(cfg)
        setup_worker_process(engine_seed(self.cfg.seed, rank), self.cfg, "rollout")
        self.rank, self.transports = rank, {}  # weight_sync.transport -> this engine's side
        engine = make_rollout_engine(self.cfg, rank, server_host(self.cfg.rollout.server_host),
                                     restarted=_reconstructed(), token=token)
        self.engine = with_rollout_fn(self.cfg, engine)

    def url(self) -> str | None:
        return self.engine.url()

    @ray.method(concurrency_group="gen")
    def generate(self, requests: list, n: int, params) -> list:
        self.fault_point(f"engine {self.rank}'s generate")
        return self.engine.generate(requests, n, params)

    @ray.method(concurrency_group="gen")
    def generate_stream(self, requests: list, n: int, params):
        """Like :meth:`generate`, yielding each request's ``n`` samples as soon as they are done
        (call with ``.options(num_returns="streaming")``)."""
        from miles_ray.rollout.engines import stream_by_request

        self.fault_point(f"engine {self.rank}'s generate")
        yield from stream_by_request(self.engine, requests, n, params)

    def abort(self, rid: str) -> bool:
        return self.engine.abort(rid)

    def rng_state(self):
        """Sampling RNG state (checkpointed so a resumed run samples as an uninterrupted one)."""
        return self.engine.rng_state()

    def set_rng_state(self, state) -> None:
        self.engine.set_rng_state(state)

    def pause(self) -> None:
        self.engine.pause()

    def resume(self) -> None:
        self.engine.resume()

    def health(self) -> dict:
        return self.engine.health()

    def weight_version(self) -> int:
        return self.health()["weight_version"]

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    # -- weight loading over a transport (miles_ray.weights; driven by jobs/weight_sync.py) ---------
    def _transport(self, name: str):
        """This engine's side of the transport ``name`` (one instance per name, kept across syncs)."""
        from miles_ray.weights.registry import weight_transport

        if name not in self.transports:
            self.transports[name] = weight_transport(name)()
        return self.transports[name]

    def transport_place(self, name: str) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), **self._transport(name).describe(self.engine)}

    def open_transport(self, name: str, args: dict) -> bool:
        transport = self._transport(name)
        transport.release()
        transport.open_receiver(args, self.engine)
        return True

    def load_part(self, name: str, payload) -> None:
        """One streamed bucket's payload; the engine serves only after :meth:`finish_load`."""
        self._transport(name).receive(payload, self.engine)

    def finish_load(self, version: int) -> int:
        return self.engine.finish_load(version)

    def load_draft(self, weights: dict, version: int) -> int:
        """New draft-model weights (speculative rollout), applied between two decode steps."""
        return self.engine.load_draft(weights, version)

    def spec_stats(self) -> dict:
        """Speculation counters since the last call (acceptance rate, accepted length, rounds)."""
        return self.engine.spec_stats()

    def __del__(self):
        if getattr(self, "engine", None) is not None:
            self.engine.close()


def server_host(configured: str | None) -> str:
    """Where engine servers bind: 127.0.0.1 unless ``rollout.server_host`` is set (``node_ip``:
    this node's address)."""
    if not configured:
        return "127.0.0.1"
    return ray.util.get_node_ip_address() if configured == "node_ip" else configured


def _reconstructed() -> bool:
    """Whether Ray restarted this actor (the API warns that it is deprecated; the warning, printed
    by every engine, would trail a benchmark's RESULT line)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ray.get_runtime_context().was_current_actor_reconstructed

