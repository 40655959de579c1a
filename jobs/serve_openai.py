"""Start and stop the run's OpenAI-compatible endpoint (``serve`` config section) on Ray Serve.

:func:`start_openai` starts Serve's HTTP proxy on ``serve.host:serve.port`` and runs the
:class:`actors.openai_serve.OpenAIServer` application ``openai`` under route prefix ``/v1`` in
front of the given engine actors; it returns the base URL an OpenAI client takes
(``http://host:port/v1``). Beyond loopback a bearer key is required: ``serve.api_key``, or one
generated here and printed once. Works with every engine kind (hf, native, in-actor or over HTTP):
the replica calls the engine actors' plain ``generate``.
"""
from __future__ import annotations

import contextlib
import logging
import secrets

from miles_ray.config import Config

log = logging.getLogger("miles_ray.serve")
APP_NAME, ROUTE_PREFIX = "openai", "/v1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def api_key(cfg: Config) -> str | None:
    """``serve.api_key``; beyond loopback without one, a fresh key (printed once by the caller)."""
    if cfg.serve.api_key or is_loopback(cfg.serve.host):
        return cfg.serve.api_key
    return "sk-miles-" + secrets.token_urlsafe(24)


def resolve_endpoint(cfg: Config) -> None:
    """Fix the run's Serve key and port before any actor starts, so the endpoint, the reward
    services and the reward workers (``jobs.cluster.reward_options``) agree: a generated key is
    printed once and stored in ``serve.api_key``; ``serve.port=0`` becomes a free port."""
    from jobs.cluster import free_port

    if not cfg.serve.enabled and cfg.reward.fn not in ("reward_model", "llm_judge"):
        return
    key = api_key(cfg)
    if key and not cfg.serve.api_key:
        print(f"OpenAI endpoint api key (generated; send it as 'Authorization: Bearer <key>'): {key}", flush=True)
        cfg.serve.api_key = key
    if not cfg.serve.port:
        cfg.serve.port = free_port(cfg.serve.host, 0)


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}{ROUTE_PREFIX}"


def start_openai(cfg: Config, engines: list, key: str | None = None) -> str:
    """Serve ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` over ``engines``;
    returns the base URL. ``key``: the bearer key to require (default: :func:`api_key`)."""
    from ray import serve

    from actors.openai_serve import OpenAIServer
    from jobs.cluster import free_port, with_resolved_model

    s = cfg.serve
    key = key if key is not None else api_key(cfg)
    if key and not s.api_key:
        print(f"OpenAI endpoint api key (generated; send it as 'Authorization: Bearer <key>'): {key}", flush=True)
    port = s.port or free_port(s.host, 0)
    serve.start(http_options={"host": s.host, "port": port})
    model = with_resolved_model(cfg).model
    settings = {"model_name": s.model_name, "max_tokens": s.max_tokens, "max_n": s.max_n, "api_key": key}
    deployment = OpenAIServer.options(max_ongoing_requests=s.max_ongoing_requests)
    serve.run(deployment.bind(list(engines), model.path, model.tiny_cache_dir, settings), name=APP_NAME,
              route_prefix=ROUTE_PREFIX, blocking=False)
    url = base_url(s.host, port)
    print(f"OpenAI-compatible endpoint: {url} (model '{s.model_name}'; /chat/completions, /completions)", flush=True)
    return url


def stop_openai() -> None:
    """Delete the ``openai`` application; shut Serve down when no other application is left."""
    from ray import serve

    try:
        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as err:  # noqa: BLE001 - the cluster may already be going down
        log.warning("stopping the OpenAI endpoint: %s", err)


@contextlib.contextmanager
def openai_endpoint(cfg: Config, engines: list):
    """The endpoint while the block runs, when ``serve.enabled`` and there are engines; yields the
    base URL (None when not serving)."""
    if not (cfg.serve.enabled and engines):
        yield None
        return
    url = start_openai(cfg, engines)
    try:
        yield url
    finally:
        stop_openai()
