"""Start and stop the run's reward services on Ray Serve (``reward.fn`` = reward_model | llm_judge).

- ``reward_model``: Serve application ``reward_model`` at route ``/reward_model`` on the Serve HTTP
  proxy (``serve.host``:``serve.port``), batched and autoscaled (:mod:`actors.reward_service`).
- ``llm_judge``: nothing to start here; it asks the run's OpenAI application (named ``openai``,
  route ``/v1``, started where ``serve.enabled`` is handled) or ``reward.service.judge_url``.

The reward workers only hold the URL (``jobs.cluster.reward_options``), so services may start after
the actors, before the first step. Other Serve applications (the OpenAI one) are left alone.
"""
from __future__ import annotations

import logging

from miles_ray.config import Config
from miles_ray.config_sections import ConfigError
from miles_ray.rewards.reward_model import resolve_reward_model_path
from miles_ray.rewards.services import OPENAI_APP, REWARD_MODEL_APP, REWARD_MODEL_ROUTE

log = logging.getLogger("miles_ray.reward_services")
SERVICE_REWARDS = ("reward_model", "llm_judge")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_reward_services(cfg: Config) -> None:
    """Fail before any actor starts on a service setting that cannot work (names the key and fix);
    writes the tiny reward model once (``reward.model_path: tiny``)."""
    r, s = cfg.reward, cfg.reward.service
    if r.fn not in SERVICE_REWARDS:
        return
    if s.max_replicas < s.min_replicas:
        raise ConfigError(f"reward.service.max_replicas={s.max_replicas} < min_replicas={s.min_replicas}")
    if s.max_ongoing_requests < s.max_batch_size:
        raise ConfigError(f"reward.service.max_ongoing_requests={s.max_ongoing_requests} < max_batch_size="
                          f"{s.max_batch_size}: a batch could never fill; raise max_ongoing_requests")
    if cfg.serve.host not in LOOPBACK and not cfg.serve.api_key:
        raise ConfigError(f"serve.host={cfg.serve.host} is beyond loopback: set serve.api_key (reward services "
                          "and the OpenAI endpoint then require it)")
    if r.fn == "reward_model":
        resolve_reward_model_path(r.model_path, cfg.model.tiny_cache_dir)
    elif not s.judge_url and not cfg.serve.enabled:
        raise ConfigError("reward.fn=llm_judge asks the run's OpenAI endpoint: set serve.enabled=true, or "
                          "reward.service.judge_url to an external OpenAI-compatible server")


def start_reward_services(cfg: Config) -> dict:
    """Start what ``reward.fn`` needs on Serve (on the Ray cluster this driver is connected to).
    Returns ``{"apps": [names started here], "url": reward-model or judge URL}`` for
    :func:`stop_reward_services` (empty lists for rule rewards)."""
    if cfg.reward.fn not in SERVICE_REWARDS:
        return {"apps": [], "url": None}
    from ray import serve

    from actors.reward_service import reward_model_app

    check_reward_services(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    base = f"http://{'127.0.0.1' if cfg.serve.host in ('0.0.0.0', '::') else cfg.serve.host}:{cfg.serve.port}"
    if cfg.reward.fn == "llm_judge":
        if not cfg.reward.service.judge_url and OPENAI_APP not in serve.status().applications:
            log.warning("llm_judge: Serve has no '%s' application yet; judge calls fail (service_error) until it "
                        "runs", OPENAI_APP)
        return {"apps": [], "url": cfg.reward.service.judge_url or f"{base}/v1"}
    path = resolve_reward_model_path(cfg.reward.model_path, cfg.model.tiny_cache_dir)
    app = reward_model_app(path, cfg.reward.service.model_dump(), cfg.model.dtype, cfg.serve.api_key)
    # returns once a replica is up; no access log line per reward request (thousands a step)
    serve.run(app, name=REWARD_MODEL_APP, route_prefix=REWARD_MODEL_ROUTE, logging_config={"enable_access_log": False})
    log.info("reward model %s served at %s%s", path, base, REWARD_MODEL_ROUTE)
    return {"apps": [REWARD_MODEL_APP], "url": base + REWARD_MODEL_ROUTE}


def stop_reward_services(started: dict) -> None:
    """Delete the applications :func:`start_reward_services` started; Serve itself is shut down
    once no application is left (the OpenAI app keeps it up)."""
    if not started.get("apps"):
        return
    from ray import serve

    try:
        for name in started["apps"]:
            serve.delete(name)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as err:  # noqa: BLE001 - stopping must not hide the run's own outcome
        log.warning("stopping reward services %s: %s: %s", started["apps"], type(err).__name__, err)
