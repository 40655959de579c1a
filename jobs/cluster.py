"""Join the Ray cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local one, then
place the actors of a run on their placement-group bundles."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import ray

from actors import BufferActor, CriticActor, RankGroup, RewardWorker, RolloutEngineActor, TrainerActor
from miles_ray.models import resolve_model_path
from placement.groups import actor_options, create_groups, remove_groups
from placement.plan import plan_placement


def init_ray(cfg, needed_cpus: float) -> None:
    if ray.is_initialized():
        return
    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=True)
        return
    cpus = cfg.cluster.local_num_cpus or max(int(needed_cpus + 0.999), os.cpu_count() or 1)
    # address="local": never join some other cluster by accident (set RAY_ADDRESS=auto for that)
    ray.init(address="local", num_cpus=cpus, num_gpus=cfg.cluster.local_num_gpus, include_dashboard=False,
             runtime_env=env, log_to_driver=True)


@dataclass
class RunActors:
    policy: RankGroup
    engines: list
    rewards: list
    buffer: object
    critic: Optional[RankGroup] = None
    groups: dict = field(default_factory=dict)

    def all(self) -> list:
        critics = self.critic.actors if self.critic else []
        return [*self.policy.actors, *critics, *self.engines, *self.rewards, self.buffer]


def with_resolved_model(cfg):
    """Resolve the model spec once in the driver (writes a tiny model once) and hand actors an
    absolute folder, so their working directory does not matter. GGUF specs stay symbolic."""
    where = resolve_model_path(cfg.model.path, cfg.model.tiny_cache_dir)
    if where["gguf_file"]:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.model.path = where["path"]
    return cfg


def start_actors(cfg) -> RunActors:
    """Plan placement, create the groups, start every actor and wait until all are ready."""
    cfg = with_resolved_model(cfg)
    n_critics = cfg.cluster.num_trainers if cfg.uses_critic else 0
    plan = plan_placement(cfg.cluster, cfg.rollout.num_engines, cfg.reward.num_workers, n_critics)
    init_ray(cfg, plan.total_resources().get("CPU", 1))
    prefix = cfg.run_name
    groups = create_groups(plan, prefix)
    cfg_dict = cfg.model_dump()

    def opts(a):
        return actor_options(a, groups, f"{prefix}-{a.role}-{a.rank}")

    world = cfg.cluster.num_trainers
    policy = RankGroup([TrainerActor.options(**opts(a)).remote(cfg_dict, a.rank, world)
                        for a in plan.for_role("trainer")])
    critic = None
    if n_critics:
        critic = RankGroup([CriticActor.options(**opts(a)).remote(cfg_dict, a.rank, n_critics)
                            for a in plan.for_role("critic")])
    engines = [RolloutEngineActor.options(**opts(a)).remote(cfg_dict, a.rank) for a in plan.for_role("rollout")]
    r = cfg.reward
    rewards = [RewardWorker.options(**opts(a)).remote(r.fn, r.timeout_s, r.failure_score, r.isolate)
               for a in plan.for_role("reward")]
    buffer = BufferActor.options(**opts(plan.for_role("buffer")[0])).remote()
    actors = RunActors(policy, engines, rewards, buffer, critic, groups)
    ray.get([a.ready.remote() for a in actors.all()])
    policy.setup()
    if critic:
        critic.setup()
    return actors


def stop_actors(actors: RunActors) -> None:
    for a in actors.all():
        ray.kill(a)
    remove_groups(actors.groups)
