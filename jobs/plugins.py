"""Config-time check of the plug-ins a config names in registries above the config's floor (rewards,
rollout functions, environments, learning-rate schedules, training backends): each is a registered
name or a ``pkg.module:attr`` checked against its contract (:mod:`miles_ray.utils.resolve`).

The registries at or below the config (losses, estimators, aggregations, filters, data sources) are
checked by ``Config`` itself. :func:`jobs.entry.config_from` runs this right after loading, so every
command (``train``, ``rollout``, ``config show``) reports a bad plug-in as one ``error:`` line before
Ray or any actor starts.
"""
from __future__ import annotations


def check_plugins(cfg) -> None:
    """Raise a :class:`~miles_ray.utils.resolve.PluginError` naming the first unusable plug-in."""
    from miles_ray.rewards.registry import check_reward_spec
    from miles_ray.training.backends import POLICY_BACKENDS
    from miles_ray.training.schedule import LR_SCHEDULES

    check_reward_spec(cfg.reward.fn)
    for spec in cfg.eval.datasets:
        if spec.reward_fn:
            check_reward_spec(spec.reward_fn, f"eval.datasets[{spec.name}].reward_fn")
    LR_SCHEDULES.check(cfg.train.lr_schedule)
    POLICY_BACKENDS.check(cfg.train.backend)
    if cfg.rollout.fn or cfg.agent.env:
        from miles_ray.agents import ENVIRONMENTS
        from miles_ray.agents.runner import ROLLOUT_FUNCTIONS

        if cfg.rollout.fn:
            ROLLOUT_FUNCTIONS.check(cfg.rollout.fn)
        if cfg.agent.env:
            ENVIRONMENTS.check(cfg.agent.env)
