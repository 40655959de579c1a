"""RolloutEngineActor: one rollout engine with explicit health (ready / released / stale).

In-actor mode runs the engine in this process. HTTP mode (``rollout.serve_http`` or the sglang
backend) launches the engine server as a subprocess inside this actor's bundle (so it sees the
bundle's GPUs) and drives it through :class:`EngineClient`: the same calls, over HTTP.
"""
from __future__ import annotations

import socket
import threading
import uuid

import ray

from actors.common import ActorBase, setup_worker_process
from miles_ray.config import Config


@ray.remote(concurrency_groups={"gen": 64})
class RolloutEngineActor(ActorBase):
    """``generate`` runs in the "gen" concurrency group (many calls share continuous batching);
    everything else runs one at a time, in call order (streamed weight loads rely on it)."""

    def __init__(self, cfg: dict, rank: int = 0):
        self.cfg = Config.model_validate(cfg)
        setup_worker_process(self.cfg.seed + 1000 + rank)
        self.rank, self.channel, self.process, self.client = rank, None, None, None
        self._parts, self._version = [], 0
        self.loop, self._lock = None, threading.Lock()
        r = self.cfg.rollout
        if r.over_http:
            self._launch()
        else:
            from miles_ray.rollout import make_engine

            d = self.cfg.draft
            spec = {"draft": d.path, "num_draft_tokens": d.num_tokens} if d.enabled else {}
            self.engine = make_engine(r.backend, model_spec=self.cfg.model.path, dtype=self.cfg.model.dtype,
                                      tiny_cache_dir=self.cfg.model.tiny_cache_dir, seed=self.cfg.seed + 1000 + rank,
                                      **spec)
            if r.backend == "native":
                from miles_ray.rollout.native.loop import EngineLoop

                self.loop = EngineLoop(self.engine)
            if _reconstructed():
                from miles_ray.rollout.health import STALE

                self.engine.state = STALE  # a restarted engine serves only after a weight refit

    def _launch(self) -> None:
        from miles_ray.models import load_tokenizer
        from miles_ray.rollout.launch import launch_server

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        host = ray.util.get_node_ip_address() if self.cfg.cluster.use_gpu else "127.0.0.1"
        c, r = self.cfg, self.cfg.rollout
        extra = (["--seed", str(c.seed + 1000 + self.rank), "--tiny-cache-dir", c.model.tiny_cache_dir]
                 if r.backend == "native" else list(r.sglang_args))
        if r.backend == "sglang" and c.draft.enabled:
            from miles_ray.rollout.sglang_backend import speculative_args

            extra += speculative_args(c.draft, c.model.path, c.output_dir, c.model.dtype, c.model.tiny_cache_dir)
        self.process, self.client = launch_server(r.backend, c.model.path, port, host, extra)
        self.tokenizer = load_tokenizer(c.model.path, c.model.tiny_cache_dir)

    def url(self) -> str | None:
        return self.client.url if self.client else None

    @ray.method(concurrency_group="gen")
    def generate(self, requests: list, n: int, params) -> list:
        if self.client:
            return self.client.generate_samples(requests, n, params, self.tokenizer)
        if self.loop is None:
            with self._lock:
                return self.engine.generate(requests, n, params)
        items = []
        for req in requests:
            ids = self.engine.tokenizer(req["prompt"], add_special_tokens=False)["input_ids"]
            items += [(ids, params, uuid.uuid4().hex, req) for _ in range(n)]
        return [self.engine.to_sample(f.result()) for f in self.loop.submit_many(items)]

    def _held(self, fn, *args):
        """Run an engine control call between two decode steps (or under the hf engine's lock)."""
        if self.loop is not None:
            return self.loop.call(fn, *args)
        with self._lock:
            return fn(*args)

    def rng_state(self):
        """Sampling RNG state (checkpointed so a resumed run samples as an uninterrupted one)."""
        import torch

        if self.client:
            return None
        gen = getattr(self.engine, "generator", None)
        return self._held(gen.get_state) if gen is not None else torch.get_rng_state()

    def set_rng_state(self, state) -> None:
        import torch

        if self.client or state is None:
            return
        gen = getattr(self.engine, "generator", None)
        self._held(gen.set_state, state) if gen is not None else torch.set_rng_state(state)

    def pause(self) -> None:
        self.client.pause() if self.client else self._held(self.engine.pause)

    def resume(self) -> None:
        self.client.resume() if self.client else self._held(self.engine.resume)

    def health(self) -> dict:
        if self.client:
            h = self.client.health()  # sglang's /health has no body: keep the version here
            state = h.get("state", "ready" if h["status"] == 200 else "stale")
            return {"state": state, "weight_version": h.get("weight_version", self._version)}
        return self.engine.health()

    def weight_version(self) -> int:
        return self.health()["weight_version"]

    def release_memory(self) -> None:
        self.client.release_memory() if self.client else self._held(self.engine.release_memory)

    def resume_memory(self) -> None:
        self.client.resume_memory() if self.client else self._held(self.engine.resume_memory)

    # -- weight loading, one method per transport ------------------------------------------------
    def load_buckets(self, buckets: list, version: int) -> int:
        if self.client:
            return self._post_buckets(buckets, version)
        return self._held(self.engine.load_buckets, buckets, version)

    def _post_buckets(self, buckets: list, version: int) -> int:
        if self.cfg.rollout.backend == "sglang":
            from miles_ray.rollout.sglang_backend import update_weights_from_buckets

            self._version = update_weights_from_buckets(self.client, buckets, version)
        else:
            self._version = self.client.update_weights_from_tensor(buckets, version)["weight_version"]
        return self._version

    def update_weights(self, weights: dict, version: int) -> int:
        from miles_ray.weights import to_buckets

        return self.load_buckets(to_buckets(weights, version), version)

    def load_part(self, item) -> None:
        """One streamed bucket: a Bucket (object store) or a (meta, handle) pair (shm / cuda_ipc)."""
        if self.client:  # HTTP engines take the whole version at finish_load
            self._parts.append(item)
            return
        if isinstance(item, tuple):
            from miles_ray.weights.ipc import HandleReader

            if not hasattr(self, "_reader"):
                self._reader = HandleReader()
            item = self._reader.open([item], keep=True)[0]
        self._held(self.engine.load_part, item)

    def finish_load(self, version: int) -> int:
        if self.client:
            parts, self._parts = self._parts, []
            return self._post_buckets(parts, version)
        return self._held(self.engine.finish_load, version)

    def load_draft(self, weights: dict, version: int) -> int:
        """New draft-model weights (speculative rollout), applied between two decode steps."""
        if self.client:
            raise RuntimeError("online draft updates reach in-actor native engines only; HTTP engines keep the "
                               "draft they were launched with (config validation requires draft.online=false)")
        self._held(self.engine.load_draft, weights, version)
        return version

    def spec_stats(self) -> dict:
        """Speculation counters since the last call (acceptance rate, accepted length, rounds)."""
        if self.client or not hasattr(self.engine, "spec_stats"):
            return {}
        return self._held(self.engine.spec_stats)

    def open_broadcast(self, addr: str, port: int, rank: int, world_size: int) -> bool:
        from miles_ray.weights import BroadcastChannel

        backend = "nccl" if self.cfg.cluster.use_gpu and _cuda() else "gloo"
        self.channel = BroadcastChannel(rank, world_size, addr, port, backend)
        return True

    def receive_broadcast(self, metas: list, version: int) -> int:
        buckets = self.channel.receive(metas)
        return self._held(self.engine.load_buckets, buckets, version)

    def __del__(self):
        if getattr(self, "process", None) is not None and self.process.poll() is None:
            self.process.kill()


def _reconstructed() -> bool:
    """Whether Ray restarted this actor (the API warns that it is deprecated; the warning, printed
    by every engine, would trail a benchmark's RESULT line)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ray.get_runtime_context().was_current_actor_reconstructed


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
