"""RolloutEngineActor: one rollout engine with explicit health (ready / released / stale).

Thin: it holds one :class:`miles_ray.rollout.engines.RolloutEngine` (in-process, or an engine
server launched in this actor's bundle and driven over HTTP) and forwards calls to it. Only what
needs Ray lives here: the node address for servers beyond loopback, whether Ray restarted this
actor, and opening shared-memory / CUDA IPC handles and broadcast groups of the weight sync.
"""
from __future__ import annotations

import ray

from actors.common import ActorBase, dist_backend, setup_worker_process
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
        self.rank, self.channel, self.reader = rank, None, None
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

    # -- weight loading, one method per transport ------------------------------------------------
    def load_buckets(self, buckets: list, version: int) -> int:
        return self.engine.load_buckets(buckets, version)

    def update_weights(self, weights: dict, version: int) -> int:
        from miles_ray.weights import to_buckets

        return self.engine.load_buckets(to_buckets(weights, version), version)

    def load_part(self, item) -> None:
        """One streamed bucket: a Bucket (object store) or a (meta, handle) pair (shm / cuda_ipc)."""
        if isinstance(item, tuple):
            from miles_ray.weights.ipc import HandleReader

            self.reader = self.reader or HandleReader()
            item = self.reader.open([item], keep=True)[0]
        self.engine.load_part(item)

    def finish_load(self, version: int) -> int:
        return self.engine.finish_load(version)

    def load_draft(self, weights: dict, version: int) -> int:
        """New draft-model weights (speculative rollout), applied between two decode steps."""
        return self.engine.load_draft(weights, version)

    def spec_stats(self) -> dict:
        """Speculation counters since the last call (acceptance rate, accepted length, rounds)."""
        return self.engine.spec_stats()

    def broadcast_ranks(self) -> int:
        """Ranks this engine takes in the weight broadcast group (a real SGLang: one per TP rank)."""
        return getattr(self.engine, "group_ranks", 1)

    def open_broadcast(self, addr: str, port: int, rank: int, world_size: int) -> bool:
        """Join the trainer's broadcast group: an engine server joins it itself (SGLang's
        init_weights_update_group), an in-actor engine through this actor."""
        if hasattr(self.engine, "open_broadcast"):
            return self.engine.open_broadcast(addr, port, rank, world_size, dist_backend(self.cfg))
        from miles_ray.weights import BroadcastChannel

        self.channel = BroadcastChannel(rank, world_size, addr, port, dist_backend(self.cfg))
        return True

    def receive_broadcast(self, metas: list, version: int) -> int:
        if hasattr(self.engine, "receive_broadcast"):
            return self.engine.receive_broadcast(metas, version)
        return self.engine.load_buckets(self.channel.receive(metas), version)

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

