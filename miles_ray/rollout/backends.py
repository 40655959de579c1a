"""The factory: the rollout engine a config asks for, over HTTP (our server or SGLang) or in the
actor's process. The top floor of :mod:`miles_ray.rollout`: it may import every implementation;
nothing in the package imports it."""
from __future__ import annotations

from miles_ray.config import Config
from miles_ray.rollout.engines import RolloutEngine


def make_rollout_engine(cfg: Config, rank: int, host: str = "127.0.0.1", restarted: bool = False,
                        token: str | None = None) -> RolloutEngine:
    """The engine the config asks for: over HTTP (``rollout.serve_http`` or the sglang backend,
    listening on ``host``, requiring ``token`` when given) or in-process. ``restarted``: the actor
    was restarted by Ray, so the engine starts STALE until a refit."""
    if cfg.rollout.over_http:
        from miles_ray.rollout.http.engine import HttpEngine

        engine = HttpEngine.launch(cfg, rank, host, token)
    else:
        from miles_ray.rollout.in_process import InProcessEngine

        engine = InProcessEngine.from_config(cfg, rank, restarted)
    return engine
