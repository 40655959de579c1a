"""``rollout.fn`` set: the engine actor wraps its engine in an :class:`AgentEngine` that runs the
function per sample (the actor composes: ``with_rollout_fn(cfg, make_rollout_engine(...))``)."""
from __future__ import annotations

from miles_ray.agents import multi_turn as _builtin  # noqa: F401  (registers the built-in functions)
from miles_ray.agents.runner import AgentEngine, AgentLimits
from miles_ray.config import Config
from miles_ray.models.loading import load_tokenizer
from miles_ray.rollout.engines import RolloutEngine


def with_rollout_fn(cfg: Config, engine: RolloutEngine) -> RolloutEngine:
    """``rollout.fn`` set: the engine runs that function per sample (:class:`AgentEngine`)."""
    if not cfg.rollout.fn:
        return engine
    a = cfg.agent
    limits = AgentLimits(a.max_turns, a.max_tokens, a.timeout_s, a.env)
    return AgentEngine(engine, cfg.rollout.fn, load_tokenizer(cfg.model.path, cfg.model.tiny_cache_dir), limits,
                       a.concurrency)
