"""HttpEngine: an engine server launched as a subprocess (our native server or
``sglang.launch_server``) and driven over its SGLang-native HTTP API.

Weights go bucket by bucket as they stream in (:meth:`load_part`), in the server's format
(:data:`WEIGHT_POSTERS`): SGLang's ``update_weights_from_tensor`` (handles to the bucket's
tensors, one entry per TP rank, or its ``flattened_bucket`` format: one flattened tensor per rank,
an unopened shm / CUDA IPC handle forwarded as it came; a real SGLang, or our server with
``--strict-sglang``) or our
pickle-free ``miles_raw`` bytes (lenient native server); :meth:`finish_load` then makes them
version ``v`` with ``/update_weight_version``. Over a broadcast group the engine server itself
joins the trainer's group (``init_weights_update_group``) and receives each tensor
(``update_weights_from_distributed``): no copy through this actor.
"""
from __future__ import annotations

import socket

from miles_ray.config import Config
from miles_ray.models import load_tokenizer
from miles_ray.rollout.sglang.client import EngineClient
from miles_ray.rollout.types import SamplingParams, engine_seed
from miles_ray.sample import Sample
from miles_ray.weights.buckets import iter_tensors


def _post_raw(client: EngineClient, bucket, tp_size: int) -> None:
    client.update_weights_raw([bucket])


def _post_sglang(client: EngineClient, bucket, tp_size: int) -> None:
    import torch

    if torch.cuda.is_available() and not bucket.flat.is_cuda:  # SGLang maps CUDA IPC handles: one bucket at a time
        bucket.flat = bucket.flat.cuda()
    client.update_weights_from_tensor(list(iter_tensors(bucket)), tp_size)


def _post_flattened(client: EngineClient, bucket, tp_size: int) -> None:
    """SGLang's ``flattened_bucket``: the bucket's ``flat`` and its metadata, one entry per TP rank.
    A bucket still unopened handle (shm / cuda_ipc, :class:`~miles_ray.weights.ipc.HandleBucket`)
    with one TP rank is forwarded: the server maps the trainer's buffer itself, this actor never
    does (a CUDA IPC tensor opened here could not be shared again)."""
    import torch

    from miles_ray.weights.ipc import HandleBucket
    from miles_ray.weights.sglang_flattened import encode_flattened, forward_flattened, metas_for

    metas = metas_for(bucket.entries, bucket.dtype)
    handle = bucket.take_handle() if tp_size == 1 and isinstance(bucket, HandleBucket) else None
    if handle is not None:
        client.update_weights_flattened([forward_flattened(handle, metas)])
        return
    if torch.cuda.is_available() and not bucket.flat.is_cuda:  # SGLang maps CUDA IPC handles: one bucket at a time
        bucket.flat = bucket.flat.cuda()
    client.update_weights_flattened(encode_flattened(bucket.flat, metas, tp_size))


WEIGHT_POSTERS = {"raw": _post_raw, "sglang": _post_sglang, "sglang_flat": _post_flattened}


def weight_format(cfg: Config) -> str:
    """raw (lenient native server), sglang (named tensors) or sglang_flat
    (``weight_sync.sglang_load_format=flattened_bucket``)."""
    if not cfg.rollout.sglang_api:
        return "raw"
    return "sglang_flat" if cfg.weight_sync.sglang_load_format == "flattened_bucket" else "sglang"


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
        self.backend, self.client, self.tokenizer, self.process = backend, client, tokenizer, process
        self.fmt, self.tp_size = fmt, tp_size
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
        WEIGHT_POSTERS[self.fmt](self.client, bucket, self.tp_size)

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

    def receive_broadcast(self, metas: list, version: int) -> int:
        from miles_ray.weights.raw import dtype_name

        entries = [(e, m["dtype"]) for m in metas for e in m["entries"]]
        self.client.update_weights_from_distributed([e[0] for e, _ in entries], [dtype_name(d) for _, d in entries],
                                                    [list(e[1]) for e, _ in entries])
        return self.finish_load(version)

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
