"""HttpEngine: an engine server launched as a subprocess (our native server or
``sglang.launch_server``) and driven over its SGLang-native HTTP API.

The server sees the GPUs of the bundle that launched it. Weights reach it whole at
:meth:`finish_load` (streamed buckets are collected first), in the payload format of its backend.
"""
from __future__ import annotations

import socket

from miles_ray.config import Config
from miles_ray.models import load_tokenizer
from miles_ray.rollout.client import EngineClient
from miles_ray.rollout.types import SamplingParams, engine_seed
from miles_ray.sample import Sample


def _post_native(client: EngineClient, buckets: list, version: int) -> int:
    return client.update_weights_from_tensor(buckets, version)["weight_version"]


def _post_sglang(client: EngineClient, buckets: list, version: int) -> int:
    from miles_ray.rollout.sglang_backend import update_weights_from_buckets

    return update_weights_from_buckets(client, buckets, version)


WEIGHT_POSTERS = {"native": _post_native, "sglang": _post_sglang}


def server_args(cfg: Config, rank: int) -> list[str]:
    """Backend-specific launch arguments: seed and tiny-model cache (native), the user's
    ``rollout.sglang_args`` and speculative-decoding flags (sglang)."""
    c, r = cfg, cfg.rollout
    if r.backend == "native":
        return ["--seed", str(engine_seed(cfg.seed, rank)), "--tiny-cache-dir", c.model.tiny_cache_dir]
    extra = list(r.sglang_args)
    if c.draft.enabled:
        from miles_ray.rollout.sglang_backend import speculative_args

        extra += speculative_args(c.draft, c.model.path, c.output_dir, c.model.dtype, c.model.tiny_cache_dir)
    return extra


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class HttpEngine:
    def __init__(self, backend: str, client: EngineClient, tokenizer, process=None):
        self.backend, self.client, self.tokenizer, self.process = backend, client, tokenizer, process
        self.version = 0  # SGLang's /health has no body: the last version posted is kept here
        self._parts: list = []

    @classmethod
    def launch(cls, cfg: Config, rank: int, host: str = "127.0.0.1") -> "HttpEngine":
        from miles_ray.rollout.launch import launch_server

        r = cfg.rollout
        process, client = launch_server(r.backend, cfg.model.path, free_port(), host, server_args(cfg, rank))
        return cls(r.backend, client, load_tokenizer(cfg.model.path, cfg.model.tiny_cache_dir), process)

    def generate(self, requests: list[dict], n: int, params: SamplingParams) -> list[Sample]:
        return self.client.generate_samples(requests, n, params, self.tokenizer)

    def abort(self, rid: str) -> bool:
        return bool(self.client.abort(rid).get("aborted", False))

    def pause(self) -> None:
        self.client.pause()

    def resume(self) -> None:
        self.client.resume()

    def load_part(self, bucket) -> None:
        self._parts.append(bucket)

    def finish_load(self, version: int) -> int:
        parts, self._parts = self._parts, []
        return self.load_buckets(parts, version)

    def load_buckets(self, buckets: list, version: int) -> int:
        self.version = WEIGHT_POSTERS[self.backend](self.client, buckets, version)
        return self.version

    def release_memory(self) -> None:
        self.client.release_memory()

    def resume_memory(self) -> None:
        self.client.resume_memory()

    def health(self) -> dict:
        h = self.client.health()
        state = h.get("state", "ready" if h["status"] == 200 else "stale")
        return {"state": state, "weight_version": h.get("weight_version", self.version)}

    def rng_state(self) -> None:
        return None  # the server owns its sampling RNG

    def set_rng_state(self, state) -> None:
        return None

    def load_draft(self, weights: dict, version: int) -> int:
        raise RuntimeError("online draft updates reach in-actor native engines only; HTTP engines keep the draft "
                           "they were launched with (config validation requires draft.online=false)")

    def spec_stats(self) -> dict:
        return {}

    def url(self) -> str:
        return self.client.url

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
