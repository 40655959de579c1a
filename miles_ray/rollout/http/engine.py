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

The update protocol (:mod:`miles_ray.rollout.sglang.protocol`, driven by jobs/weight_sync.py):
:meth:`pause` (the version's mode: retract for partial rollout, else abort; then
``/begin_weight_update`` where the version has sessions), the loads, :meth:`finish_load`
(``/end_weight_update``, ``/flush_cache`` - counted in :attr:`cache_flushes`, a failed flush raises
- and ``/update_weight_version`` with ``abort_all_requests=false``), :meth:`resume`.
"""
from __future__ import annotations

from miles_ray.config import Config
from miles_ray.models import load_tokenizer
from miles_ray.rollout.http.launch import free_port, launch_on_free_port  # noqa: F401 - free_port: re-exported
from miles_ray.rollout.sglang.client import EngineClient
from miles_ray.rollout.sglang.protocol import Protocol, protocol_for
from miles_ray.rollout.types import SamplingParams, engine_seed
from miles_ray.sample import Sample
from miles_ray.utils.sglang_version import resolve_sglang_version
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
    routed = ["--enable-return-routed-experts"] if c.algorithm.routing_replay == "r3" and r.sglang_api else []
    if r.backend == "native":
        stats = ["--stats-path", f"{c.output_dir}/sglang-stand-in-{rank}.json"]
        strict = ["--strict-sglang", "--sglang-version", resolve_sglang_version(r.sglang_version), *routed, *stats] if r.strict_sglang else []
        return [*common, *strict, "--seed", str(engine_seed(cfg.seed, rank)), "--tiny-cache-dir",
                c.model.tiny_cache_dir, "--max-request-mb", str(r.max_request_mb)]
    extra = [*common, *routed, *r.sglang_args]
    if c.draft.enabled:
        from miles_ray.rollout.sglang.backend import speculative_args

        extra += speculative_args(c.draft, c.model.path, c.output_dir, c.model.dtype, c.model.tiny_cache_dir)
    return extra


def engine_protocol(cfg: Config) -> Protocol:
    """The SGLang version spoken (``rollout.sglang_version``); lenient servers take the newest."""
    from miles_ray.rollout.sglang.protocol import SUPPORTED

    return protocol_for(resolve_sglang_version(cfg.rollout.sglang_version) if cfg.rollout.sglang_api else SUPPORTED[-1])


def routed_topk(cfg: Config) -> int | None:
    """Top-k of the MoE router (config.json ``num_experts_per_tok``) when R3 asks engines for
    routed experts (None: not asked)."""
    if cfg.algorithm.routing_replay != "r3":
        return None
    import json
    from pathlib import Path

    from miles_ray.models import resolve_model_path

    folder = resolve_model_path(cfg.model.path, cfg.model.tiny_cache_dir)["path"]
    return json.loads((Path(folder) / "config.json").read_text()).get("num_experts_per_tok")


def configure_client(client: EngineClient, cfg: Config) -> EngineClient:
    """The client speaks the configured SGLang version: its protocol, routed experts for R3 (decoded
    with the model's top-k), ``selector="target"`` with a frozen separate draft."""
    client.protocol = engine_protocol(cfg)
    client.selector = "target" if cfg.draft.enabled else None
    client.routed_topk = routed_topk(cfg)
    return client


def router_client(cfg: Config, url: str) -> EngineClient:
    """A client of the router (the sync driver's rollout path), speaking the engines' protocol."""
    return configure_client(EngineClient(url), cfg)


class HttpEngine:
    def __init__(self, backend: str, client: EngineClient, tokenizer, process=None, fmt: str = "raw",
                 tp_size: int = 1, partial: bool = False):
        """``fmt``: a payload format's name (:func:`weight_format`); ``partial``: partial rollout
        (in-flight requests survive a weight update)."""
        self.backend, self.client, self.tokenizer, self.process = backend, client, tokenizer, process
        self.fmt, self.tp_size, self.partial = payload_format(fmt), tp_size, partial
        self.group_ranks = tp_size if backend == "sglang" else 1  # a real SGLang joins one rank per TP rank
        self.version = 0  # SGLang's /health has no body: the last version posted is kept here
        self.cache_flushes = 0
        self.in_update = False

    @classmethod
    def launch(cls, cfg: Config, rank: int, host: str = "127.0.0.1", token: str | None = None,
               env: dict | None = None) -> "HttpEngine":
        r = cfg.rollout
        extra = server_args(cfg, rank)
        if token and r.backend == "sglang":
            extra += ["--api-key", token]  # SGLang's own bearer check (add_api_key_middleware)
        process, client = launch_on_free_port(r.backend, cfg.model.path, host, extra, token=token, env=env)
        configure_client(client, cfg)
        return cls(r.backend, client, load_tokenizer(cfg.model.path, cfg.model.tiny_cache_dir), process,
                   weight_format(cfg), cfg.cluster.gpus_per_engine, cfg.async_rl.enabled)

    def generate(self, requests: list[dict], n: int, params: SamplingParams) -> list[Sample]:
        return self.client.generate_samples(requests, n, params, self.tokenizer)

    def abort(self, rid: str) -> bool:
        return self.client.abort(rid)

    def pause(self) -> None:
        """Step 1 of the update protocol: pause in the version's mode, open the update session."""
        p = self.client.protocol
        self.client.pause(p.pause_mode(self.partial))
        if p.update_session:
            self.client.begin_weight_update()
        self.in_update = True

    def resume(self) -> None:
        self.client.resume()
        self.in_update = False

    def load_part(self, bucket) -> None:
        self.client.post_weights(self.fmt.body(bucket, self.tp_size))

    def finish_load(self, version: int) -> int:
        """Close the session (0.5.23), flush the prefix cache (counted), then the new version."""
        if self.in_update and self.client.protocol.update_session:
            self.client.end_weight_update()
        if self.in_update:
            if not self.client.flush_cache():
                raise RuntimeError(f"{self.client.url}: /flush_cache failed after the weight update")
            self.cache_flushes += 1
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

    def update_stats(self) -> dict:
        return {"cache_flushes": self.cache_flushes}

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
