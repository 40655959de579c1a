"""Memory plan: per-GPU memory of every role and placement from the model's ``config.json`` alone
(no weights, no Ray), checked against ``cluster.gpu_memory_gib`` before a GPU run starts.

    plan = memory_plan(cfg, read_model_config(cfg.model.path, cfg.model.tiny_cache_dir))
    print(render_plan(plan)); plan.fits; plan.problem()

Parameter, gradient and optimizer bytes are exact (:mod:`miles_ray.plan.trainer`); activations,
KV cache and margins are estimates with stated assumptions (:mod:`miles_ray.plan.types`).
The package sits just above :mod:`miles_ray.config`: it imports config, models, errors and utils only.
"""
from miles_ray.plan.layout import Plan, memory_plan  # noqa: F401
from miles_ray.plan.params import active_parameters, count_parameters, inventory, read_model_config  # noqa: F401
from miles_ray.plan.render import render_plan  # noqa: F401


def plan_for(cfg) -> Plan:
    """The plan of a config, reading ``model.path``'s config.json."""
    return memory_plan(cfg, read_model_config(cfg.model.path, cfg.model.tiny_cache_dir))
