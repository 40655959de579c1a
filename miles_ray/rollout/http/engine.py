"""HttpEngine: an engine server launched as a subprocess (our native server or
``sglang.launch_server``) and driven over its SGLang-native HTTP API.

Weights go bucket by bucket as they stream in (:meth:`load_part`), each in the server's payload
format (:func:`weight_format` picks its name in :data:`miles_ray.weights.registry.WEIGHT_FORMATS`):
SGLang's ``update_weights_from_tensor`` named tensors (``sglang_tensor``) or ``flattened_bucket``
(``sglang_flattened``, an unopened shm / CUDA IPC handle forwarded as it came) for a real SGLang or
our server with ``--strict-sglang``, our pickle-free ``miles_raw`` bytes (``raw``) for the lenient
native server; :meth:`finish_load` then makes them version ``v`` with ``/update_weight_version``.
Over a broadcast group the engine server itself joins the trainer's group
(``init_weights_update_group``, :meth:`open_broadcast`) and receives each tensor
(``update_weights_from_distributed``, :meth:`receive_broadcast`): no copy through this actor.
"""
from __future__ import annotations

import socket

from miles_ray.config import Config
from miles_ray.models import load_tokenizer
from miles_ray.rollout.sglang.client import EngineClient
from miles_ray.rollout.types import SamplingParams, engine_seed
from miles_ray.sample import Sample
from miles_ray.weights.registry import payload_format


def weight_format(cfg: Config) -> str:
    """The payload format's name: ``raw`` (lenient native server), ``sglang_tensor`` (named tensors) or
    ``sglang_flattened`` (``weight_sync.sglang_load_format=flattened_bucket``)."""
    if not cfg.rollout.sglang_api:
        return "raw"
    return "sglang_flattened" if cfg.weight_sync.sglang_load_format == "flattened_bucket" else "sglang_tensor"


def server_args(cfg: Config, rank: int) -> list[str]:
    """Launch arguments: dtype, TP size (``cluster.gpus_per_engine``), --mem-fraction-static when
    colocated; seed, tiny-model cache and strict mode (native); the user's ``rollout.sglang_args``
    and speculative-decoding flags (sglang)."""
    c, r = cfg, cfg.rollout
    common = ["--dtype", c.model.dtype, "--tp-size", str(c.cluster.gpus_per_engine)]
    fraction = r.mem_fraction_static or (0.5 if c.cluster.colocate else None)
    if fraction is not None:
        common += ["--mem-fraction-static", str(fraction)]
    if r.backend == "native":
        strict = ["--strict-sglang"] if r.strict_sglang else []
        return [*common, *strict, "--seed", str(engine_seed(cfg.seed, rank)), "--tiny-cache-dir",
                c.model.tiny_cache_dir, "--max-request-mb", str(r.max_request_mb)]
    extra = [*common, *r.sglang_args]
    if c.draft.enabled:
        from miles_ray.rollout.sglang.backend import speculative_args

        extra += speculative_args(c.draft, c.model.path, c.output_dir, c.model.dtype, c.model.tiny_cache_dir)
    return extra


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HttpEngine:
    def __init__(self, backend: str, client: EngineClient, tokenizer, process=None, fmt: str = "raw",
                 tp_size: int = 1):
        """``fmt``: a payload format's name (:func:`weight_format`)."""
        self.backend, self.client, self.tokenizer, self.process = backend, client, tokenizer, process
        self.fmt, self.tp_size = payload_format(fmt), tp_size
        self.group_ranks = tp_size if backend == "sglang" else 1  # a real SGLang joins one rank per TP rank
        self.version = 0  # SGLang's /health has no body: the last version posted is kept here

    @classmethod
    def launch(cls, cfg: Config, rank: int, host: str = "127.0.0.1", token: str | None = None,
               env: dict | None = None) -> "HttpEngine":
        from miles_ray.rollout.http.launch import launch_server

        r = cfg.rollout
        extra = server_args(cfg, rank)
        if token and r.backend == "sglang":
            extra += ["--api-key", token]  # SGLang's own bearer check (add_api_key_middleware)
        process, client = launch_server(r.backend, cfg.model.path, free_port(host), host, extra, token=token, env=env)
        return cls(r.backend, client, load_tokenizer(cfg.model.path, cfg.model.tiny_cache_dir), process,
                   weight_format(cfg), cfg.cluster.gpus_per_engine)

    def generate(self, requests: list[dict], n: int, params: SamplingParams) -> list[Sample]:
        return self.client.generate_samples(requests, n, params, self.tokenizer)

    def abort(self, rid: str) -> bool:
        return bool(self.client.abort(rid).get("aborted", False))

    def pause(self) -> None:
        self.client.pause()

    def resume(self) -> None:
        self.client.resume()

    def load_part(self, bucket) -> None:
        self.client.post_weights(self.fmt.body(bucket, self.tp_size))

    def finish_load(self, version: int) -> int:
        self.version = self.client.update_weight_version(version)
        return self.version

    def load_buckets(self, buckets: list, version: int) -> int:
        for b in buckets:
            self.load_part(b)
        return self.finish_load(version)

    # -- broadcast: the server joins the trainer's group (SGLang's distributed update) ---------
    def open_broadcast(self, addr: str, port: int, rank: int, world_size: int, backend: str) -> bool:
        self.client.init_weights_update_group(addr, port, rank, world_size, backend)
        return True

    def receive_broadcast(self, metas: list) -> None:
        """The server receives the buckets ``metas`` describe, one broadcast per tensor; the engine is
        STALE until :meth:`finish_load`."""
        from miles_ray.weights.raw import dtype_name

        entries = [(e, m["dtype"]) for m in metas for e in m["entries"]]
        self.client.update_weights_from_distributed([e[0] for e, _ in entries], [dtype_name(d) for _, d in entries],
                                                    [list(e[1]) for e, _ in entries])

    def release_memory(self) -> None:
        self.client.release_memory()

    def resume_memory(self) -> None:
        self.client.resume_memory()

    def health(self) -> dict:
        h = self.client.health()
        state = h.get("state", "ready" if h["status"] == 200 else "stale")
        return {"state": state, "weight_version": int(h.get("weight_version", self.version))}

    def rng_state(self) -> None:
        return None  # the server owns its sampling RNG

    def set_rng_state(self, state) -> None:
        return None

    def load_draft(self, weights: dict, version: int) -> int:
        raise RuntimeError("online draft updates reach in-actor native engines only; HTTP engines keep the draft "
                           "they were launched with (config validation requires draft.online=false)")

    def spec_stats(self) -> dict:
        return {}

    def url(self) -> str | None:
        return self.client.url

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
